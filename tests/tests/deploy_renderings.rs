//! What the manifests must get right on a real cluster, checked on every rendering a user can
//! compose: each overlay with every combination of the opt-in components. Namespaced objects
//! all carry the namespace (a component's objects included, which the base's `namespace:` does
//! not reach); the base creates no Namespace, so `kubectl delete -k` cannot take the trainer's
//! volume with it; no pod selects nodes on a label only GPU feature discovery sets; and the
//! gpu overlay rolls out without a spare GPU, ranks generators below the trainer and fails
//! loudly without a working GPU.

mod deploy_support;

use deploy_support::*;
use serde_json::Value;

const OVERLAYS: [&str; 2] = ["overlays/cpu", "overlays/gpu"];
const COMPONENTS: [&str; 5] = [
    "auth",
    "tls",
    "servicemonitor",
    "namespace",
    "gpu-node-affinity",
];
/// Kinds that live outside any namespace.
const CLUSTER_SCOPED: [&str; 6] = [
    "Namespace",
    "PriorityClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "StorageClass",
];

/// Every overlay × subset of components, rendered (in parallel: each is a kustomize run).
fn every_rendering() -> Vec<Rendered> {
    let mut specs = Vec::new();
    for overlay in OVERLAYS {
        for mask in 0..(1u32 << COMPONENTS.len()) {
            let mut spec = overlay.to_owned();
            for (i, c) in COMPONENTS.iter().enumerate() {
                if mask & (1 << i) != 0 {
                    spec.push('+');
                    spec.push_str(c);
                }
            }
            specs.push(spec);
        }
    }
    let mut rendered = Vec::new();
    for batch in specs.chunks(8) {
        let handles: Vec<_> = batch
            .iter()
            .cloned()
            .map(|spec| std::thread::spawn(move || Rendered::render(&spec)))
            .collect();
        rendered.extend(handles.into_iter().map(|h| h.join().expect("render")));
    }
    rendered
}

fn name_of(o: &Value) -> String {
    format!("{}/{}", str_of(&o["kind"]), str_of(&o["metadata"]["name"]))
}

#[test]
fn every_rendering_namespaces_its_objects_and_needs_no_gpu_discovery_labels() {
    let renderings = every_rendering();
    assert_eq!(renderings.len(), OVERLAYS.len() << COMPONENTS.len());
    for r in &renderings {
        let spec = &r.spec;
        let mut namespaces: Vec<&str> = Vec::new();
        for o in &r.objects {
            let kind = str_of(&o["kind"]);
            let namespace = o["metadata"]["namespace"].as_str().unwrap_or("");
            if CLUSTER_SCOPED.contains(&kind) {
                assert!(
                    namespace.is_empty(),
                    "{spec}: {} has a namespace",
                    name_of(o)
                );
                continue;
            }
            assert!(
                !namespace.is_empty(),
                "{spec}: {} has no namespace",
                name_of(o)
            );
            namespaces.push(namespace);
        }
        namespaces.dedup();
        assert_eq!(
            namespaces.len(),
            1,
            "{spec}: objects spread over {namespaces:?}"
        );

        // The Namespace comes only from its component; the volume outlives any deletion.
        let created: Vec<&Value> = r.of_kind("Namespace").collect();
        if spec.contains("+namespace") {
            assert_eq!(created.len(), 1, "{spec}");
            assert_eq!(created[0]["metadata"]["name"], namespaces[0], "{spec}");
            let labels = &created[0]["metadata"]["labels"];
            assert_eq!(labels["pod-security.kubernetes.io/enforce"], "restricted");
        } else {
            assert!(
                created.is_empty(),
                "{spec}: the rendering creates its Namespace"
            );
        }
        // CPU nodes run the image without CUDA libraries; GPU nodes the one with them.
        for (kind, name) in [
            ("StatefulSet", "synopsis-trainer"),
            ("Deployment", "synopsis-generator"),
        ] {
            let image = str_of(&r.workload(kind, name).container["image"]).to_owned();
            assert_eq!(
                image.ends_with("-cpu"),
                spec.starts_with("overlays/cpu"),
                "{spec}: {name} runs {image}"
            );
        }
        let trainer = r.get("StatefulSet", "synopsis-trainer");
        let retention = &trainer["spec"]["persistentVolumeClaimRetentionPolicy"];
        assert_eq!(retention["whenDeleted"], "Retain", "{spec}");
        assert_eq!(retention["whenScaled"], "Retain", "{spec}");

        // The nvidia.com/gpu request selects GPU nodes everywhere; gpu.present exists only
        // where GPU feature discovery runs, and pods requiring it stay Pending elsewhere.
        let text = serde_json::to_string(&r.objects).unwrap();
        assert!(
            !text.contains("gpu.present"),
            "{spec}: selects on gpu.present"
        );
        if !spec.contains("gpu-node-affinity") {
            assert!(!text.contains("nodeAffinity"), "{spec}");
        }
    }
}

#[test]
fn gpu_overlay_rolls_without_a_spare_gpu_and_yields_gpus_to_the_trainer() {
    for spec in ["overlays/gpu", "overlays/gpu+gpu-node-affinity"] {
        let r = Rendered::render(spec);
        let generator = r.workload("Deployment", "synopsis-generator");
        let trainer = r.workload("StatefulSet", "synopsis-trainer");

        // A surge pod needs a GPU nobody has spare: roll by replacing one pod at a time.
        let rolling = &generator.object["spec"]["strategy"]["rollingUpdate"];
        assert_eq!(rolling["maxSurge"], 0, "{spec}");
        assert_eq!(rolling["maxUnavailable"], 1, "{spec}");

        let priority = |w: &Workload| {
            let class = str_of(&w.pod_spec()["priorityClassName"]).to_owned();
            r.get("PriorityClass", &class).clone()
        };
        let (t, g) = (priority(&trainer), priority(&generator));
        assert!(
            t["value"].as_i64() > g["value"].as_i64(),
            "{spec}: the trainer must outrank the generators"
        );
        assert_eq!(g["preemptionPolicy"], "Never", "{spec}");
        assert_ne!(g["globalDefault"], true, "{spec}");
        assert_ne!(t["globalDefault"], true, "{spec}");

        for w in [&generator, &trainer] {
            assert_eq!(
                w.arg("--device").as_deref(),
                Some("cuda"),
                "{spec}: {}",
                w.name()
            );
            let gpus = &w.container["resources"]["limits"]["nvidia.com/gpu"];
            assert!(gpus == 1 || gpus == "1", "{spec}: {}: {gpus}", w.name());
            assert!(
                w.pod_spec()["nodeSelector"].is_null(),
                "{spec}: {}",
                w.name()
            );
            let terms = &w.pod_spec()["affinity"]["nodeAffinity"]
                ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
            if spec.ends_with("gpu-node-affinity") {
                // Every alternative requires a CUDA 13 driver and compute capability 7.5+.
                for term in as_array(terms) {
                    let keys: Vec<&str> = as_array(&term["matchExpressions"])
                        .iter()
                        .map(|e| str_of(&e["key"]))
                        .collect();
                    assert!(
                        keys.contains(&"nvidia.com/cuda.driver-version.major"),
                        "{keys:?}"
                    );
                    assert!(keys.contains(&"nvidia.com/gpu.compute.major"), "{keys:?}");
                }
            } else {
                assert!(terms.is_null(), "{spec}: {}", w.name());
            }
        }
        // Generators scale on load (KEDA), not on CPU.
        assert_eq!(r.of_kind("HorizontalPodAutoscaler").count(), 0, "{spec}");
        assert_eq!(r.of_kind("ScaledObject").count(), 1, "{spec}");
    }
}

/// The client retry policy deploy/README.md documents parses as a gRPC service config that
/// grpc-go and grpcio accept (gRFC A6 rules: at least two attempts, positive durations as
/// decimal seconds with an `s`, a positive multiplier, canonical status code names) and
/// retries only on UNAVAILABLE, the code a draining or departed generator answers with.
#[test]
fn the_documented_client_service_config_is_a_valid_retry_policy() {
    let readme =
        std::fs::read_to_string(synopsis_tests::workspace_root().join("deploy/README.md")).unwrap();
    let after = readme
        .split_once("<!-- service-config -->")
        .expect("the service config is marked in deploy/README.md")
        .1;
    let json = after
        .split_once("```json")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("a json block follows the marker")
        .0;
    let config: Value = serde_json::from_str(json).expect("the service config is JSON");

    assert!(
        as_array(&config["loadBalancingConfig"])
            .iter()
            .any(|p| p["round_robin"].is_object()),
        "{config}"
    );
    let duration = |v: &Value| {
        let text = str_of(v);
        let secs = text.strip_suffix('s').expect("a duration ends with s");
        assert!(
            secs.chars().all(|c| c.is_ascii_digit() || c == '.'),
            "duration {text}"
        );
        let secs: f64 = secs.parse().expect("decimal seconds");
        assert!(secs > 0.0, "duration {text}");
        secs
    };
    let methods = as_array(&config["methodConfig"]);
    assert!(!methods.is_empty());
    for method in methods {
        for name in as_array(&method["name"]) {
            assert_eq!(name["service"], "synopsis.v1.Generator", "{method}");
        }
        let retry = &method["retryPolicy"];
        let attempts = retry["maxAttempts"].as_u64().expect("maxAttempts");
        assert!((2..=5).contains(&attempts), "{retry}");
        let initial = duration(&retry["initialBackoff"]);
        let max = duration(&retry["maxBackoff"]);
        assert!(initial <= max, "{retry}");
        assert!(
            retry["backoffMultiplier"].as_f64().unwrap_or(0.0) > 0.0,
            "{retry}"
        );
        let codes: Vec<&str> = as_array(&retry["retryableStatusCodes"])
            .iter()
            .map(str_of)
            .collect();
        assert_eq!(codes, ["UNAVAILABLE"], "{retry}");
    }
}
