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

use deploy_support::*;
use serde_json::Value;
use synopsis_proto::v1::generator_client::GeneratorClient;
use synopsis_proto::v1::trainer_client::TrainerClient;
use synopsis_proto::v1::{
    generate_response, train_event, train_request, GenerateRequest, HyperParams, ModelInfoRequest,
    ModelSpec, RunState, TrainRequest,
};
use synopsis_tests::{free_port, workspace_bin, ServiceProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

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

        let hpa = r.get("HorizontalPodAutoscaler", GENERATOR.1);
        assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], GENERATOR.0);
        assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], GENERATOR.1);
        assert!(
            hpa["spec"]["minReplicas"].as_u64().unwrap_or(1) >= 2,
            "{spec}"
        );
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
        let (Check::Grpc { port, .. } | Check::Tcp { port }) = probe.check;
        assert_eq!(port, grpc, "{name}: {} probes another port", probe.kind);
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

/// The container port a Service's `port` reaches on workload `w`.
fn service_target(w: &Workload, service: &Value, port: u16) -> u16 {
    let entry = as_array(&service["spec"]["ports"])
        .iter()
        .find(|p| port_of(&p["port"]) == port)
        .unwrap_or_else(|| panic!("Service {} has no port {port}", service["metadata"]["name"]));
    let target = if entry["targetPort"].is_null() {
        &entry["port"]
    } else {
        &entry["targetPort"]
    };
    w.container_port(target)
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

/// Local stand-ins for what the cluster provides: a directory per volume, a port per container
/// port, 127.0.0.1 for Service names.
struct Cluster<'a> {
    rendered: &'a Rendered,
    workloads: Vec<Workload<'a>>,
    dir: tempfile::TempDir,
    ports: BTreeMap<(String, u16), u16>,
}

impl<'a> Cluster<'a> {
    fn new(rendered: &'a Rendered, workloads: Vec<Workload<'a>>) -> Self {
        let mut ports = BTreeMap::new();
        for w in &workloads {
            for port in w.container_ports() {
                ports.insert((w.name().to_owned(), port), free_port());
            }
        }
        let dir = tempfile::tempdir().unwrap();
        Cluster {
            rendered,
            workloads,
            dir,
            ports,
        }
    }

    fn workload(&self, name: &str) -> &Workload<'a> {
        self.workloads.iter().find(|w| w.name() == name).unwrap()
    }

    fn local_port(&self, workload: &str, container_port: u16) -> u16 {
        self.ports[&(workload.to_owned(), container_port)]
    }

    fn volume(&self, w: &Workload, mount: &str) -> PathBuf {
        self.dir
            .path()
            .join(w.name())
            .join(mount.trim_start_matches('/'))
    }

    /// A value of an argument or variable as it reads on this machine.
    fn map(&self, w: &Workload, value: &str) -> String {
        for any in ["0.0.0.0:", "[::]:"] {
            if let Some(port) = value.strip_prefix(any) {
                let port: u16 = port.parse().unwrap();
                assert!(w.container_ports().contains(&port), "{}: {value}", w.name());
                return format!("127.0.0.1:{}", self.local_port(w.name(), port));
            }
        }
        if let Some((scheme, _)) = value.split_once("://") {
            let (host, port) = url_host_port(value);
            if let Some(service) = self.rendered.service_for_host(&host) {
                let target = self
                    .workloads
                    .iter()
                    .find(|t| t.selected_by(&service["spec"]["selector"]))
                    .unwrap_or_else(|| panic!("Service {host} selects no workload"));
                let local = self.local_port(target.name(), service_target(target, service, port));
                return format!("{scheme}://127.0.0.1:{local}");
            }
        }
        for (mount, _) in w.mounts() {
            if let Some(rest) = value.strip_prefix(&mount) {
                if rest.is_empty() || rest.starts_with('/') {
                    return format!("{}{rest}", self.volume(w, &mount).display());
                }
            }
        }
        value.to_owned()
    }

    /// Starts the workload's binary with its declared arguments and environment, mapped, and
    /// nothing else of this machine's environment (the image sets HOME=/tmp).
    fn start(&self, name: &str) -> ServiceProcess {
        let w = self.workload(name);
        for (mount, _) in w.mounts() {
            std::fs::create_dir_all(self.volume(w, &mount)).unwrap();
        }
        let args: Vec<String> = w
            .args()
            .iter()
            .map(|a| match a.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => {
                    format!("{flag}={}", self.map(w, value))
                }
                _ => self.map(w, a),
            })
            .collect();
        let mut command = Command::new(workspace_bin(w.binary()));
        command.args(&args).env_clear();
        for (key, value) in w.env() {
            command.env(key, self.map(w, &value));
        }
        let tmp = self.map(w, "/tmp");
        command.env("HOME", &tmp).env("TMPDIR", &tmp);
        let mut process = ServiceProcess::from_command(command).unwrap();
        process.set_grace(Duration::from_secs(w.termination_grace_secs()));
        process
    }
}

async fn health(port: u16, service: &str) -> anyhow::Result<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(response.into_inner().status())
}

/// Whether the kubelet would count `check` (on local `port`) as passing right now.
async fn passes(check: &Check, port: u16) -> Result<(), String> {
    match check {
        Check::Grpc { service, .. } => match health(port, service).await {
            Ok(ServingStatus::Serving) => Ok(()),
            Ok(status) => Err(format!("status {}", status.as_str_name())),
            Err(e) => Err(format!("{e:#}")),
        },
        Check::Tcp { .. } => tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
    }
}

async fn wait_passes(process: &ServiceProcess, probe: &Probe, port: u16, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        assert!(
            process.try_status().is_none(),
            "exited:\n{}",
            process.log_tail()
        );
        let result = passes(&probe.check, port).await;
        match result {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                panic!(
                    "{} {:?} never passed: {e}\n{}",
                    probe.kind,
                    probe.check,
                    process.log_tail()
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// GET `path` over plain HTTP/1.1; the status line and body.
async fn http_get(port: u16, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// ~40 short synopses that pass the trainer's cleaning rules.
fn corpus_csv() -> String {
    let heroes = [
        "A young pilot",
        "An old detective",
        "A quiet student",
        "A lonely robot",
    ];
    let places = ["a floating city", "the frozen north", "a haunted school"];
    let goals = [
        "searches for her brother",
        "must stop a war",
        "uncovers a conspiracy",
    ];
    let mut csv = String::from("MAL_ID,Name,Genres,Synopsis\n");
    let mut id = 0;
    for hero in heroes {
        for place in places {
            for goal in goals {
                id += 1;
                csv.push_str(&format!(
                    "{id},\"Story {id}\",\"Drama\",\"{hero} from {place} {goal}. Along the way, \
                     friends are made and old secrets come to light.\"\n"
                ));
            }
        }
    }
    csv
}

fn tiny_run(data_path: &str) -> TrainRequest {
    TrainRequest {
        data: Some(train_request::Data::DataPath(data_path.to_owned())),
        model: Some(ModelSpec {
            preset: "tiny".into(),
            n_layer: 2,
            n_embd: 64,
            n_head: 2,
            n_positions: 64,
            vocab_size: 500,
        }),
        hyper: Some(HyperParams {
            epochs: 1,
            batch_size: 4,
            learning_rate: 3e-3,
            warmup_steps: 2,
            min_chars: 20,
            seed: 7,
            eval_fraction: 0.1,
            seq_len: 64,
            sample_tokens: 4,
            ..Default::default()
        }),
        run_name: "deploy manifests".into(),
        ..Default::default()
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
