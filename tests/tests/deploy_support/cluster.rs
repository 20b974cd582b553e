//! Running what the manifests declare on this machine: a stand-in cluster (a directory per
//! volume, a port per container port, 127.0.0.1 for Service names) that starts a workload's
//! binary with exactly its arguments and environment, probes run as the kubelet runs them, and
//! a tiny training run for the generator to pick up.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use synopsis_proto::v1::{train_request, HyperParams, ModelSpec, TrainRequest};
use synopsis_tests::{free_port, workspace_bin, ServiceProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::*;

/// Local stand-ins for what the cluster provides: a directory per volume, a port per container
/// port, 127.0.0.1 for Service names.
pub struct Cluster<'a> {
    rendered: &'a Rendered,
    workloads: Vec<Workload<'a>>,
    dir: tempfile::TempDir,
    ports: BTreeMap<(String, u16), u16>,
}

impl<'a> Cluster<'a> {
    pub fn new(rendered: &'a Rendered, workloads: Vec<Workload<'a>>) -> Self {
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

    pub fn workload(&self, name: &str) -> &Workload<'a> {
        self.workloads.iter().find(|w| w.name() == name).unwrap()
    }

    pub fn local_port(&self, workload: &str, container_port: u16) -> u16 {
        self.ports[&(workload.to_owned(), container_port)]
    }

    pub fn volume(&self, w: &Workload, mount: &str) -> PathBuf {
        self.dir
            .path()
            .join(w.name())
            .join(mount.trim_start_matches('/'))
    }

    /// A value of an argument or variable as it reads on this machine.
    pub fn map(&self, w: &Workload, value: &str) -> String {
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
    pub fn start(&self, name: &str) -> ServiceProcess {
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

pub async fn health(port: u16, service: &str) -> anyhow::Result<ServingStatus> {
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
pub async fn passes(check: &Check, port: u16) -> Result<(), String> {
    match check {
        Check::Grpc { service, .. } => match health(port, service).await {
            Ok(ServingStatus::Serving) => Ok(()),
            Ok(status) => Err(format!("status {}", status.as_str_name())),
            Err(e) => Err(format!("{e:#}")),
        },
        Check::Http { path, .. } => {
            // The kubelet counts 200-399 as success.
            let response = http_get(port, path).await;
            let code: u16 = response
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(format!(
                    "HTTP {path}: {}",
                    response.lines().next().unwrap_or("")
                ))
            }
        }
        Check::Tcp { .. } => tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
    }
}

pub async fn wait_passes(process: &ServiceProcess, probe: &Probe, port: u16, within: Duration) {
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

/// GET `path` over plain HTTP/1.1; the status line and body (empty if nothing answers).
pub async fn http_get(port: u16, path: &str) -> String {
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return String::new();
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    response
}

/// ~40 short synopses that pass the trainer's cleaning rules.
pub fn corpus_csv() -> String {
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

pub fn tiny_run(data_path: &str) -> TrainRequest {
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
