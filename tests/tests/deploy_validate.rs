//! The Kubernetes manifests and the Dockerfile pass the checks a cluster and a reviewer would
//! apply: scripts/deploy-check.sh renders every overlay (with and without the opt-in
//! components), validates each object against the Kubernetes schemas (offline) and runs
//! checkov, failing on any check that is not skipped with a reason.

use std::process::Command;

use synopsis_tests::workspace_root;

#[test]
fn manifests_validate_and_pass_checkov() {
    let script = workspace_root().join("scripts/deploy-check.sh");
    let output = Command::new(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} failed ({}):\n{stdout}\n{stderr}",
        script.display(),
        output.status
    );
    for rendered in ["cpu", "gpu", "cpu-secure", "gpu-all"] {
        assert!(
            stdout.contains(&format!("checkov target/deploy/rendered/{rendered}.yaml")),
            "{rendered} was not checked:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("kubernetes-validate 1.30.0: all objects valid"),
        "{stdout}"
    );
    assert!(stdout.contains("checkov deploy/Dockerfile"), "{stdout}");
    assert!(stdout.contains("deploy check passed"), "{stdout}");
}
