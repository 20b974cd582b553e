//! Readiness means "a model is live and the pod is not draining" in every rendering, TLS
//! included: the kubelet's gRPC probes cannot speak TLS, so the tls component probes HTTP
//! `/readyz` on the plaintext metrics port. Here the tls rendering's trainer and generator are
//! started with exactly the flags, settings and certificate files it declares, and its
//! generator readiness probe is run as the kubelet runs it: failing before a model is live,
//! passing once the trainer's first checkpoint is.

mod deploy_support;

use std::path::Path;
use std::time::Duration;

use deploy_support::cluster::*;
use deploy_support::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use synopsis_proto::v1::trainer_client::TrainerClient;
use synopsis_proto::v1::{train_event, RunState};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

const TRAINER: (&str, &str) = ("StatefulSet", "synopsis-trainer");
const GENERATOR: (&str, &str) = ("Deployment", "synopsis-generator");
const START: Duration = Duration::from_secs(60);
const TRAIN: Duration = Duration::from_secs(600);

/// The Secret the tls component mounts: a CA and a certificate naming both Services and the
/// local address the stand-in cluster maps them to. Returns the CA's PEM.
fn write_tls_secret(dirs: &[&Path]) -> String {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let names = [
        "synopsis-trainer",
        "synopsis-generator",
        "localhost",
        "127.0.0.1",
    ];
    let cert = CertificateParams::new(names.map(String::from).to_vec())
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    for dir in dirs {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    }
    ca.pem()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_rendering_is_ready_only_once_a_model_is_live() {
    let r = Rendered::render("overlays/cpu+tls");
    let cluster = Cluster::new(
        &r,
        vec![
            r.workload(TRAINER.0, TRAINER.1),
            r.workload(GENERATOR.0, GENERATOR.1),
        ],
    );
    let trainer_w = cluster.workload(TRAINER.1);
    let generator_w = cluster.workload(GENERATOR.1);
    let secret = "/etc/synopsis/tls";
    for w in [trainer_w, generator_w] {
        assert!(w.mounts().iter().any(|(m, _)| m == secret), "{}", w.name());
    }
    let ca = write_tls_secret(&[
        &cluster.volume(trainer_w, secret),
        &cluster.volume(generator_w, secret),
    ]);

    let trainer = cluster.start(TRAINER.1);
    for probe in trainer_w.probes() {
        let port = cluster.local_port(TRAINER.1, probe.check.port());
        wait_passes(&trainer, &probe, port, START).await;
    }

    // The generator: alive, and its readiness probe answers "not ready" with no model.
    let generator = cluster.start(GENERATOR.1);
    let probes = generator_w.probes();
    let readiness = probes.iter().find(|p| p.kind == "readinessProbe").unwrap();
    let Check::Http { path, .. } = &readiness.check else {
        panic!("under TLS the kubelet cannot run a gRPC probe: {readiness:?}");
    };
    let ready_port = cluster.local_port(GENERATOR.1, readiness.check.port());
    for probe in probes.iter().filter(|p| p.kind != "readinessProbe") {
        let port = cluster.local_port(GENERATOR.1, probe.check.port());
        wait_passes(&generator, probe, port, START).await;
    }
    let deadline = tokio::time::Instant::now() + START;
    let answer = loop {
        let answer = http_get(ready_port, path).await;
        if !answer.is_empty() || tokio::time::Instant::now() >= deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        answer.starts_with("HTTP/1.1 503"),
        "ready with no model: {answer}"
    );
    assert!(passes(&readiness.check, ready_port).await.is_err());

    // Train over TLS; the generator downloads the checkpoint over TLS and turns ready.
    let data_root = cluster.map(trainer_w, &trainer_w.arg("--data-root").unwrap());
    std::fs::create_dir_all(&data_root).unwrap();
    std::fs::write(Path::new(&data_root).join("tiny.csv"), corpus_csv()).unwrap();
    let trainer_port = cluster.local_port(TRAINER.1, trainer_w.named_port("grpc"));
    let channel = Endpoint::from_shared(format!("https://127.0.0.1:{trainer_port}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("synopsis-trainer"),
        )
        .unwrap()
        .connect()
        .await
        .expect("TLS connection to the trainer");
    let mut events = TrainerClient::new(channel)
        .train(tiny_run("tiny.csv"))
        .await
        .unwrap()
        .into_inner();
    let finished = tokio::time::timeout(TRAIN, async {
        loop {
            let event = events.message().await.unwrap().expect("run ended early");
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

    wait_passes(&generator, readiness, ready_port, TRAIN).await;
    let answer = http_get(ready_port, path).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
