//! The rendered Kubernetes manifests as the deploy tests read them: objects from
//! `scripts/deploy-render.sh --json`, the one container of each workload with its command,
//! arguments, environment (ConfigMaps resolved), ports, probes and mounts, and the Services
//! that route to it. Anything the tests cannot interpret is a panic naming the object, so a new
//! kind of probe or environment source is never silently left unchecked.

#![allow(dead_code)]

pub mod cluster;

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::Value;
use synopsis_tests::workspace_root;

/// Every object of one rendering (`overlays/cpu`, `overlays/gpu+auth+tls`…).
pub struct Rendered {
    pub spec: String,
    pub objects: Vec<Value>,
}

impl Rendered {
    pub fn render(spec: &str) -> Rendered {
        let script = workspace_root().join("scripts/deploy-render.sh");
        let output = Command::new(&script)
            .args([spec, "--json"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            output.status.success(),
            "rendering {spec} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let objects: Vec<Value> = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("{spec}: rendered JSON does not parse: {e}"));
        Rendered {
            spec: spec.to_owned(),
            objects,
        }
    }

    pub fn get(&self, kind: &str, name: &str) -> &Value {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{}: no {kind}/{name}", self.spec))
    }

    pub fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects.iter().filter(move |o| o["kind"] == kind)
    }

    pub fn workload(&self, kind: &str, name: &str) -> Workload<'_> {
        let object = self.get(kind, name);
        let containers = as_array(&object["spec"]["template"]["spec"]["containers"]);
        assert_eq!(containers.len(), 1, "{kind}/{name}: one container expected");
        Workload {
            rendered: self,
            object,
            container: &containers[0],
        }
    }

    /// The Service called `host` (short name or `name.namespace[.svc[.cluster.local]]`).
    pub fn service_for_host(&self, host: &str) -> Option<&Value> {
        self.of_kind("Service").find(|s| {
            let name = str_of(&s["metadata"]["name"]);
            let ns = str_of(&s["metadata"]["namespace"]);
            [
                name.to_owned(),
                format!("{name}.{ns}"),
                format!("{name}.{ns}.svc"),
                format!("{name}.{ns}.svc.cluster.local"),
            ]
            .iter()
            .any(|n| n == host)
        })
    }
}

/// What the kubelet checks, with the port resolved to a container port number.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    Grpc { port: u16, service: String },
    Tcp { port: u16 },
    Http { port: u16, path: String },
}

impl Check {
    pub fn port(&self) -> u16 {
        match self {
            Check::Grpc { port, .. } | Check::Tcp { port } | Check::Http { port, .. } => *port,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Probe {
    /// startupProbe, livenessProbe or readinessProbe.
    pub kind: &'static str,
    pub check: Check,
}

pub struct Workload<'a> {
    pub rendered: &'a Rendered,
    pub object: &'a Value,
    pub container: &'a Value,
}

impl Workload<'_> {
    pub fn name(&self) -> &str {
        str_of(&self.object["metadata"]["name"])
    }

    pub fn pod_spec(&self) -> &Value {
        &self.object["spec"]["template"]["spec"]
    }

    pub fn pod_labels(&self) -> &serde_json::Map<String, Value> {
        self.object["spec"]["template"]["metadata"]["labels"]
            .as_object()
            .unwrap_or_else(|| panic!("{}: pod template has no labels", self.name()))
    }

    pub fn pod_annotation(&self, key: &str) -> Option<&str> {
        self.object["spec"]["template"]["metadata"]["annotations"][key].as_str()
    }

    /// The binary the container runs (`command[0]`; the image has no entrypoint).
    pub fn binary(&self) -> &str {
        let command = as_array(&self.container["command"]);
        assert_eq!(
            command.len(),
            1,
            "{}: command is the binary alone",
            self.name()
        );
        str_of(&command[0])
    }

    pub fn args(&self) -> Vec<String> {
        as_array(&self.container["args"])
            .iter()
            .map(|a| str_of(a).to_owned())
            .collect()
    }

    /// The value of `--flag=VALUE` or `--flag VALUE` in the arguments.
    pub fn arg(&self, flag: &str) -> Option<String> {
        let args = self.args();
        let prefix = format!("{flag}=");
        args.iter().enumerate().find_map(|(i, a)| {
            a.strip_prefix(&prefix)
                .map(str::to_owned)
                .or_else(|| (a == flag).then(|| args.get(i + 1).cloned()).flatten())
        })
    }

    /// The container's environment: ConfigMaps of `envFrom` first, then `env` on top, as the
    /// kubelet builds it.
    pub fn env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for source in as_array_or_empty(&self.container["envFrom"]) {
            let Some(name) = source["configMapRef"]["name"].as_str() else {
                panic!(
                    "{}: only configMapRef envFrom is understood: {source}",
                    self.name()
                );
            };
            let data = self.rendered.get("ConfigMap", name)["data"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            for (k, v) in data {
                env.insert(k, str_of(&v).to_owned());
            }
        }
        for var in as_array_or_empty(&self.container["env"]) {
            let Some(value) = var["value"].as_str() else {
                panic!(
                    "{}: only literal env values are understood: {var}",
                    self.name()
                );
            };
            env.insert(str_of(&var["name"]).to_owned(), value.to_owned());
        }
        env
    }

    /// containerPort of a port given by number or by name.
    pub fn container_port(&self, port: &Value) -> u16 {
        let ports = as_array(&self.container["ports"]);
        let found = match port {
            Value::Number(n) => ports
                .iter()
                .find(|p| p["containerPort"].as_u64() == n.as_u64()),
            Value::String(name) => ports.iter().find(|p| p["name"] == name.as_str()),
            _ => None,
        };
        let found =
            found.unwrap_or_else(|| panic!("{}: port {port} is not a container port", self.name()));
        port_of(&found["containerPort"])
    }

    pub fn named_port(&self, name: &str) -> u16 {
        self.container_port(&Value::String(name.to_owned()))
    }

    pub fn container_ports(&self) -> Vec<u16> {
        as_array(&self.container["ports"])
            .iter()
            .map(|p| port_of(&p["containerPort"]))
            .collect()
    }

    pub fn probes(&self) -> Vec<Probe> {
        let mut probes = Vec::new();
        for kind in ["startupProbe", "livenessProbe", "readinessProbe"] {
            let probe = &self.container[kind];
            if probe.is_null() {
                continue;
            }
            let check = if probe["grpc"].is_object() {
                Check::Grpc {
                    port: self.container_port(&probe["grpc"]["port"]),
                    service: probe["grpc"]["service"].as_str().unwrap_or("").to_owned(),
                }
            } else if probe["httpGet"].is_object() {
                assert!(
                    probe["httpGet"]["scheme"].as_str().unwrap_or("HTTP") == "HTTP",
                    "{}: {kind} must be plain HTTP: {probe}",
                    self.name()
                );
                Check::Http {
                    port: self.container_port(&probe["httpGet"]["port"]),
                    path: probe["httpGet"]["path"].as_str().unwrap_or("/").to_owned(),
                }
            } else if probe["tcpSocket"].is_object() {
                Check::Tcp {
                    port: self.container_port(&probe["tcpSocket"]["port"]),
                }
            } else {
                panic!(
                    "{}: {kind} of a kind the test does not check: {probe}",
                    self.name()
                );
            };
            probes.push(Probe { kind, check });
        }
        probes
    }

    /// (mountPath, read-only) of each volume mount.
    pub fn mounts(&self) -> Vec<(String, bool)> {
        as_array_or_empty(&self.container["volumeMounts"])
            .iter()
            .map(|m| {
                let read_only = m["readOnly"].as_bool().unwrap_or(false);
                (str_of(&m["mountPath"]).to_owned(), read_only)
            })
            .collect()
    }

    pub fn termination_grace_secs(&self) -> u64 {
        self.pod_spec()["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30)
    }

    pub fn pre_stop_sleep_secs(&self) -> u64 {
        self.container["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Whether `selector` (matchLabels or a Service's plain map) selects this workload's pods.
    pub fn selected_by(&self, selector: &Value) -> bool {
        let selector = selector.get("matchLabels").unwrap_or(selector);
        let Some(selector) = selector.as_object() else {
            return false;
        };
        let labels = self.pod_labels();
        !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

pub fn str_of(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v}"))
}

pub fn port_of(v: &Value) -> u16 {
    v.as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("expected a port number, got {v}"))
}

pub fn as_array(v: &Value) -> &Vec<Value> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected a list, got {v}"))
}

fn as_array_or_empty(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// The port of a `HOST:PORT` listen address such as `0.0.0.0:50051`.
pub fn listen_port(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("not a HOST:PORT address: {addr}"))
}

/// (host, port) of a URL such as `http://synopsis-trainer:50051`.
pub fn url_host_port(url: &str) -> (String, u16) {
    let rest = url
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or_else(|| panic!("not a URL: {url}"));
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = authority
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("URL without a port: {url}"));
    let port = port
        .parse()
        .unwrap_or_else(|_| panic!("URL with a bad port: {url}"));
    (host.to_owned(), port)
}

/// The container port a Service's `port` reaches on workload `w`.
pub fn service_target(w: &Workload, service: &Value, port: u16) -> u16 {
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
