//! The Kubernetes manifests agree with the binaries they run. Rendered with the real kustomize,
//! every overlay's ports, probes, Services, NetworkPolicy and grace periods are checked against
//! each other and every setting against the binaries' flags; then the cpu overlay's trainer
//! and generator are started here with exactly the arguments and environment their containers
//! declare (ports and volumes mapped to local ones, Service names to 127.0.0.1) and each probe
//! the manifests declare is run against them, as the kubelet would.

mod deploy_support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use deploy_support::cluster::*;
use deploy_support::*;
use serde_json::Value;
use synopsis_proto::v1::generator_client::GeneratorClient;
use synopsis_proto::v1::trainer_client::TrainerClient;
use synopsis_proto::v1::{
    generate_response, train_event, GenerateRequest, ModelInfoRequest, RunState,
};
use synopsis_tests::workspace_bin;
use tonic_health::pb::health_check_response::ServingStatus;

const TRAINER: (&str, &str) = ("StatefulSet", "synopsis-trainer");
const GENERATOR: (&str, &str) = ("Deployment", "synopsis-generator");
/// Every deployable rendering: the overlays alone and with the opt-in components.
const RENDERINGS: [&str; 4] = [
    "overlays/cpu",
    "overlays/gpu",
    "overlays/cpu+auth+tls",
    "overlays/gpu+auth+tls+servicemonitor",
];
/// Bounds on waiting, so a broken server fails the test instead of hanging it.
const START: Duration = Duration::from_secs(60);
const TRAIN: Duration = Duration::from_secs(600);

#[test]
fn ports_probes_services_and_policies_agree() {
    for spec in RENDERINGS {
        let r = Rendered::render(spec);
        let trainer = r.workload(TRAINER.0, TRAINER.1);
        let generator = r.workload(GENERATOR.0, GENERATOR.1);
        for w in [&trainer, &generator] {
            check_workload(&r, w);
        }

        // Generators dial the trainer's Service, which routes to the trainer's gRPC port.
        let url = generator
            .arg("--trainer")
            .expect("generator follows a trainer");
        let (host, port) = url_host_port(&url);
        let service = r
            .service_for_host(&host)
            .unwrap_or_else(|| panic!("{spec}: --trainer {url} names no Service"));
        assert!(
            trainer.selected_by(&service["spec"]["selector"]),
            "{spec}: {host}"
        );
        assert_eq!(
            service_target(&trainer, service, port),
            trainer.named_port("grpc")
        );

        // Only generators reach the trainer's gRPC port.
        let grpc = trainer.named_port("grpc");
        let mut admitted = false;
        for policy in r.of_kind("NetworkPolicy") {
            if !trainer.selected_by(&policy["spec"]["podSelector"]) {
                continue;
            }
            for rule in as_array(&policy["spec"]["ingress"]) {
                let ports: Vec<u16> = as_array(&rule["ports"])
                    .iter()
                    .map(|p| trainer.container_port(&p["port"]))
                    .collect();
                if !ports.contains(&grpc) {
                    continue;
                }
                let from = as_array(&rule["from"]);
                assert!(
                    from.iter().all(|f| generator.selected_by(&f["podSelector"])
                        && f["namespaceSelector"].is_null()),
                    "{spec}: {} opens the trainer's gRPC port beyond generators",
                    policy["metadata"]["name"]
                );
                admitted = true;
            }
        }
        assert!(
            admitted,
            "{spec}: no NetworkPolicy admits generators to the trainer"
        );

        // Streams in flight get the whole drain grace before the kubelet's SIGKILL.
        let drain: u64 = generator.env()["SYNOPSIS_DRAIN_GRACE_SECS"]
            .parse()
            .unwrap();
        assert!(
            generator.termination_grace_secs() >= generator.pre_stop_sleep_secs() + drain + 5,
            "{spec}: generator grace period shorter than preStop + drain"
        );
        assert!(
            trainer.termination_grace_secs() >= 60,
            "{spec}: trainer checkpoint grace"
        );

        // Exactly one autoscaler owns the generator count: the CPU HPA or KEDA's ScaledObject.
        let scalers: Vec<&Value> = r
            .objects
            .iter()
            .filter(|o| {
                (o["kind"] == "HorizontalPodAutoscaler" || o["kind"] == "ScaledObject")
                    && o["spec"]["scaleTargetRef"]["name"] == GENERATOR.1
            })
            .collect();
        assert_eq!(scalers.len(), 1, "{spec}: autoscalers {scalers:?}");
        let scaler = scalers[0];
        if scaler["kind"] == "HorizontalPodAutoscaler" {
            assert_eq!(scaler["spec"]["scaleTargetRef"]["kind"], GENERATOR.0);
        }
        let min = scaler["spec"]["minReplicas"]
            .as_u64()
            .or(scaler["spec"]["minReplicaCount"].as_u64())
            .unwrap_or(1);
        assert!(min >= 2, "{spec}: fewer than two generators");
        let pdb = r.get("PodDisruptionBudget", GENERATOR.1);
        assert!(
            generator.selected_by(&pdb["spec"]["selector"]),
            "{spec}: PDB"
        );
    }
}

/// Listen address, metrics, probes, Services and writable paths of one workload agree.
fn check_workload(r: &Rendered, w: &Workload) {
    let name = format!("{}: {}", r.spec, w.name());
    let grpc = w.named_port("grpc");
    let listen = w
        .arg("--listen")
        .unwrap_or_else(|| panic!("{name}: no --listen"));
    assert_eq!(
        listen_port(&listen),
        grpc,
        "{name}: --listen vs the grpc port"
    );

    let env = w.env();
    let metrics = env
        .get("SYNOPSIS_METRICS_LISTEN")
        .unwrap_or_else(|| panic!("{name}: no metrics endpoint"));
    assert_eq!(listen_port(metrics), w.named_port("metrics"), "{name}");
    assert_eq!(
        w.pod_annotation("prometheus.io/scrape"),
        Some("true"),
        "{name}"
    );
    assert_eq!(
        w.pod_annotation("prometheus.io/port"),
        Some(w.named_port("metrics").to_string().as_str()),
        "{name}"
    );

    let probes = w.probes();
    for kind in ["livenessProbe", "readinessProbe"] {
        assert!(probes.iter().any(|p| p.kind == kind), "{name}: no {kind}");
    }
    for probe in &probes {
        // gRPC and TCP probes reach the gRPC port; HTTP ones the plaintext metrics port,
        // where /readyz and /healthz live.
        let expected = match probe.check {
            Check::Http { .. } => w.named_port("metrics"),
            _ => grpc,
        };
        assert_eq!(
            probe.check.port(),
            expected,
            "{name}: {} probes another port",
            probe.kind
        );
    }

    // Every container that writes declares its ephemeral storage, so the kubelet evicts
    // the one pod over its limit instead of every pod of a node whose disk fills.
    for key in ["requests", "limits"] {
        assert!(
            w.container["resources"][key]["ephemeral-storage"].is_string(),
            "{name}: no ephemeral-storage {key}"
        );
    }

    // Each Service port of the workload routes to a container port of the same number.
    let services: Vec<&Value> = r
        .of_kind("Service")
        .filter(|s| w.selected_by(&s["spec"]["selector"]))
        .collect();
    assert!(!services.is_empty(), "{name}: no Service");
    for service in services {
        for port in as_array(&service["spec"]["ports"]) {
            let number = port_of(&port["port"]);
            assert_eq!(service_target(w, service, number), number, "{name}");
        }
    }

    // A read-only root: whatever the process writes lies on a writable volume.
    assert_eq!(
        w.container["securityContext"]["readOnlyRootFilesystem"], true,
        "{name}"
    );
    let writable: Vec<String> = w
        .mounts()
        .into_iter()
        .filter(|(_, read_only)| !read_only)
        .map(|(path, _)| path)
        .collect();
    let on_volume = |path: &str| {
        writable
            .iter()
            .any(|m| path == m || path.starts_with(&format!("{m}/")))
    };
    assert!(on_volume("/tmp"), "{name}: /tmp is not writable");
    for flag in ["--root", "--data-root", "--models-root", "--cache-dir"] {
        if let Some(path) = w.arg(flag) {
            assert!(
                on_volume(&path),
                "{name}: {flag} {path} is on the read-only root"
            );
        }
    }
}

#[test]
fn every_setting_and_argument_is_a_flag_of_the_binary() {
    let mut help: BTreeMap<String, String> = BTreeMap::new();
    for spec in RENDERINGS {
        let r = Rendered::render(spec);
        for (kind, name) in [TRAINER, GENERATOR] {
            let w = r.workload(kind, name);
            let text = help.entry(w.binary().to_owned()).or_insert_with(|| {
                let out = Command::new(workspace_bin(w.binary()))
                    .arg("--help")
                    .env_clear()
                    .output()
                    .unwrap_or_else(|e| panic!("cannot run {} --help: {e}", w.binary()));
                assert!(out.status.success(), "{} --help failed", w.binary());
                String::from_utf8_lossy(&out.stdout).into_owned()
            });
            for key in w.env().keys().filter(|k| k.starts_with("SYNOPSIS_")) {
                assert!(
                    text.contains(&format!("[env: {key}")),
                    "{spec}: {name} sets {key}, which {} does not read",
                    w.binary()
                );
            }
            for arg in w.args() {
                let flag = arg.split('=').next().unwrap_or(&arg);
                assert!(
                    text.contains(&format!("{flag} ")) || text.contains(&format!("{flag}=")),
                    "{spec}: {name} passes {flag}, which {} does not take",
                    w.binary()
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_overlay_runs_as_declared_and_every_probe_passes() {
    let r = Rendered::render("overlays/cpu");
    let cluster = Cluster::new(
        &r,
        vec![
            r.workload(TRAINER.0, TRAINER.1),
            r.workload(GENERATOR.0, GENERATOR.1),
        ],
    );
    let trainer_w = cluster.workload(TRAINER.1);
    let generator_w = cluster.workload(GENERATOR.1);
    let trainer_grpc = cluster.local_port(TRAINER.1, trainer_w.named_port("grpc"));
    let generator_grpc = cluster.local_port(GENERATOR.1, generator_w.named_port("grpc"));

    // The trainer: startup, liveness and readiness pass; metrics are served where annotated.
    let trainer = cluster.start(TRAINER.1);
    for probe in trainer_w.probes() {
        wait_passes(&trainer, &probe, trainer_grpc, START).await;
    }
    assert_metrics_served(&cluster, trainer_w).await;

    // A generator with no model yet: alive, not ready.
    let generator = cluster.start(GENERATOR.1);
    let probes = generator_w.probes();
    let readiness = probes.iter().find(|p| p.kind == "readinessProbe").unwrap();
    let Check::Grpc { service, .. } = &readiness.check else {
        panic!("generator readiness must follow the gRPC health status: {readiness:?}");
    };
    for probe in probes.iter().filter(|p| p.kind != "readinessProbe") {
        wait_passes(&generator, probe, generator_grpc, START).await;
    }
    let deadline = tokio::time::Instant::now() + START;
    let status = loop {
        match health(generator_grpc, service).await {
            Ok(status) => break status,
            Err(e) if tokio::time::Instant::now() >= deadline => panic!("{e:#}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert_eq!(status, ServingStatus::NotServing, "ready with no model");

    // Train on a CSV under the trainer's --data-root volume; the generator, which knows the
    // trainer only by its Service address, picks the checkpoint up and turns ready.
    let data_root = cluster.map(trainer_w, &trainer_w.arg("--data-root").unwrap());
    std::fs::create_dir_all(&data_root).unwrap();
    std::fs::write(PathBuf::from(&data_root).join("tiny.csv"), corpus_csv()).unwrap();
    let mut client = TrainerClient::connect(format!("http://127.0.0.1:{trainer_grpc}"))
        .await
        .unwrap();
    let mut events = client
        .train(tiny_run("tiny.csv"))
        .await
        .unwrap()
        .into_inner();
    let finished = tokio::time::timeout(TRAIN, async {
        loop {
            let event = events
                .message()
                .await
                .unwrap()
                .expect("run ended without finishing");
            if let Some(train_event::Event::Finished(f)) = event.event {
                break f;
            }
        }
    })
    .await
    .expect("training did not finish");
    assert_eq!(
        finished.state(),
        RunState::Completed,
        "{}",
        finished.message
    );
    let checkpoint = finished.last_checkpoint_id;
    assert!(!checkpoint.is_empty());

    wait_passes(&generator, readiness, generator_grpc, TRAIN).await;
    let mut gen = GeneratorClient::connect(format!("http://127.0.0.1:{generator_grpc}"))
        .await
        .unwrap();
    let info = gen
        .model_info(ModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.live_checkpoint_id, checkpoint,
        "served a checkpoint not from the trainer"
    );
    let mut stream = gen
        .generate(GenerateRequest {
            prompt: "A young pilot".into(),
            max_new_tokens: 4,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut started = None;
    let mut done = false;
    while let Some(message) = stream.message().await.unwrap() {
        match message.event {
            Some(generate_response::Event::Started(s)) => started = Some(s.checkpoint_id),
            Some(generate_response::Event::Finished(_)) => done = true,
            _ => {}
        }
    }
    assert_eq!(started.as_deref(), Some(checkpoint.as_str()));
    assert!(done);
    assert_metrics_served(&cluster, generator_w).await;

    // Every generator metric an autoscaler of any rendering scales on is one this binary
    // exports: a renamed gauge would leave KEDA scaling on nothing.
    let metrics_port = cluster.local_port(GENERATOR.1, generator_w.named_port("metrics"));
    let scrape = http_get(metrics_port, "/metrics").await;
    let mut scaled_on = Vec::new();
    for spec in RENDERINGS {
        scaled_on.extend(autoscaler_metrics(&Rendered::render(spec)));
    }
    assert!(
        scaled_on.iter().any(|m| m.contains("queue_depth"))
            && scaled_on.iter().any(|m| m.contains("streams_in_flight")),
        "no rendering scales on generator load: {scaled_on:?}"
    );
    for name in &scaled_on {
        assert!(
            scrape.contains(&format!("# TYPE {name} ")),
            "the autoscaler scales on {name}, which the generator does not export:\n{scrape}"
        );
    }

    // SIGTERM, as the kubelet sends it: each exits cleanly within its grace period.
    for (w, process) in [(generator_w, &generator), (trainer_w, &trainer)] {
        process.sigterm();
        let grace = Duration::from_secs(w.termination_grace_secs() - w.pre_stop_sleep_secs());
        let status = process
            .wait_exit(grace)
            .unwrap_or_else(|| panic!("{} outlived its grace period", w.name()));
        assert!(
            status.success(),
            "{}: {status}\n{}",
            w.name(),
            process.log_tail()
        );
    }
}

/// The `synopsis_generator_*` metrics that a rendering's autoscalers query (KEDA Prometheus
/// triggers, HPA Pods or External metrics).
fn autoscaler_metrics(r: &Rendered) -> Vec<String> {
    let mut texts = Vec::new();
    for o in r.of_kind("ScaledObject") {
        for trigger in as_array(&o["spec"]["triggers"]) {
            texts.push(
                trigger["metadata"]["query"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            );
        }
    }
    for o in r.of_kind("HorizontalPodAutoscaler") {
        for m in as_array(&o["spec"]["metrics"]) {
            for key in ["pods", "external"] {
                if let Some(name) = m[key]["metric"]["name"].as_str() {
                    texts.push(name.to_owned());
                }
            }
        }
    }
    let mut names = Vec::new();
    for text in texts {
        let mut rest = text.as_str();
        while let Some(i) = rest.find("synopsis_generator_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.push(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    names.sort();
    names.dedup();
    names
}

/// The metrics endpoint answers where the scrape annotations point.
async fn assert_metrics_served(cluster: &Cluster<'_>, w: &Workload<'_>) {
    let port: u16 = w
        .pod_annotation("prometheus.io/port")
        .unwrap()
        .parse()
        .unwrap();
    let path = w.pod_annotation("prometheus.io/path").unwrap_or("/metrics");
    let response = http_get(cluster.local_port(w.name(), port), path).await;
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "{}: {response}",
        w.name()
    );
    assert!(response.contains("# TYPE"), "{}: {response}", w.name());
}
