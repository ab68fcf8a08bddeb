//! Identity for reports the tests post themselves. A collector under its defaults
//! (`--identity tofu`) binds each instance id to the credential of its first report, so the
//! harness posts every made-up instance with a credential derived from its id: tests and
//! `fleetsim` that speak for the same id agree, and a real agent (with its own random one)
//! never shares an id with them.

pub const CREDENTIAL_HEADER: &str = "X-Phoenix-Instance-Credential";

/// The credential the harness presents for `instance_id`.
pub fn harness_credential(instance_id: &str) -> String {
    format!("phoenix-e2e-harness-credential/{instance_id}")
}

/// The credential a real agent made for itself in its state dir.
pub fn agent_credential(state_dir: &std::path::Path) -> Option<String> {
    std::fs::read_to_string(state_dir.join("instance-credential"))
        .ok()
        .map(|s| s.trim().to_owned())
}
