//! Who this instance is: flags first, then cloud-init's instance data, then EC2's metadata
//! service (IMDSv2, only on EC2 hardware), then a stable local fallback.

use std::path::Path;
use std::time::Duration;

use phoenix_wire::Identity;

#[derive(Debug)]
pub struct Overrides<'a> {
    pub instance_id: Option<&'a str>,
    pub image_id: Option<&'a str>,
    pub group: Option<&'a str>,
    /// The image id recorded in the baked baseline, if one is on disk.
    pub baked_image_id: Option<String>,
    /// Root of the files to read (tests point it at a fake /run and /etc).
    pub root: &'a Path,
}

pub fn discover(o: &Overrides) -> Identity {
    let hostname = read_trim(&o.root.join("proc/sys/kernel/hostname"))
        .or_else(|| read_trim(&o.root.join("etc/hostname")))
        .unwrap_or_else(|| "localhost".into());
    let boot_id = read_trim(&o.root.join("proc/sys/kernel/random/boot_id")).unwrap_or_default();
    let boot_time = boot_time(o.root);
    // An id given explicitly but unusable is a mistake in the config: say so once and loudly,
    // before falling back, so an instance does not report under a surprising name unnoticed.
    for (flag, v) in [("--instance-id", o.instance_id), ("--image-id", o.image_id)] {
        if let Some(v) = v.filter(|v| !phoenix_wire::valid_id(v)) {
            tracing::warn!(
                flag,
                value = %v,
                "ignoring an invalid {flag}: use 1-128 chars of A-Z a-z 0-9 - _ . : /; \
                 discovering the id instead (cloud-init, IMDS, or the host's machine id)"
            );
        }
    }
    let mut instance_id = o.instance_id.map(str::to_owned);
    let mut image_id = o.image_id.map(str::to_owned);
    if instance_id.is_none() || image_id.is_none() {
        let (ci_inst, ci_img) = cloud_init(&o.root.join("run/cloud-init/instance-data.json"));
        instance_id = instance_id.or(ci_inst);
        image_id = image_id.or(ci_img);
    }
    if (instance_id.is_none() || image_id.is_none()) && on_ec2(o.root) {
        let (i, m) = imds();
        instance_id = instance_id.or(i);
        image_id = image_id.or(m);
    }
    let instance_id = instance_id
        .filter(|s| phoenix_wire::valid_id(s))
        .unwrap_or_else(|| fallback_id(&hostname, o.root));
    let image_id = image_id
        .or_else(|| o.baked_image_id.clone())
        .filter(|s| phoenix_wire::valid_id(s))
        .unwrap_or_else(|| "unknown".into());
    Identity {
        instance_id,
        image_id,
        group: o.group.map(str::to_owned),
        hostname,
        boot_id,
        version: env!("CARGO_PKG_VERSION").into(),
        boot_time,
    }
}

fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn boot_time(root: &Path) -> u64 {
    let stat = std::fs::read_to_string(root.join("proc/stat")).unwrap_or_default();
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// cloud-init's standard keys (`v1.instance_id`), and the image id where the datasource has one.
fn cloud_init(path: &Path) -> (Option<String>, Option<String>) {
    let Ok(data) = std::fs::read(path) else {
        return (None, None);
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&data) else {
        return (None, None);
    };
    let s = |p: &str| v.pointer(p).and_then(|x| x.as_str()).map(str::to_owned);
    let inst = s("/v1/instance_id").or_else(|| s("/v1/instance-id"));
    let img = s("/v1/image_id")
        .or_else(|| s("/ds/meta_data/ami-id"))
        .or_else(|| s("/ds/meta_data/ami_id"))
        .or_else(|| s("/ds/meta_data/imageId"));
    (inst, img)
}

/// Only ask the metadata service where there is one: a stray request elsewhere costs a
/// time-out at every start and goes to an address nobody vetted.
fn on_ec2(root: &Path) -> bool {
    let vendor = read_trim(&root.join("sys/class/dmi/id/sys_vendor")).unwrap_or_default();
    let uuid = read_trim(&root.join("sys/hypervisor/uuid")).unwrap_or_default();
    vendor.contains("Amazon") || uuid.starts_with("ec2")
}

fn imds() -> (Option<String>, Option<String>) {
    let cfg = crate::tls::lean_buffers(ureq::Agent::config_builder())
        .timeout_global(Some(Duration::from_millis(500)))
        .http_status_as_error(false)
        .build();
    let agent = ureq::Agent::new_with_config(cfg);
    let base = "http://169.254.169.254/latest";
    let token = agent
        .put(&format!("{base}/api/token"))
        .header("X-aws-ec2-metadata-token-ttl-seconds", "60")
        .send_empty()
        .ok()
        .filter(|r| r.status() == 200)
        .and_then(|mut r| r.body_mut().read_to_string().ok());
    let Some(token) = token else {
        return (None, None);
    };
    let get = |p: &str| {
        agent
            .get(&format!("{base}/meta-data/{p}"))
            .header("X-aws-ec2-metadata-token", &token)
            .call()
            .ok()
            .filter(|r| r.status() == 200)
            .and_then(|mut r| r.body_mut().read_to_string().ok())
    };
    (get("instance-id"), get("ami-id"))
}

/// Stable across restarts of the same machine; never reveals the machine-id itself.
fn fallback_id(hostname: &str, root: &Path) -> String {
    let mid = read_trim(&root.join("etc/machine-id")).unwrap_or_default();
    let h = blake3::hash(mid.as_bytes()).to_hex();
    let host: String = hostname
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(64)
        .collect();
    format!(
        "{}-{}",
        if host.is_empty() { "host" } else { &host },
        &h[..12]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_init_then_fallback() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("run/cloud-init")).unwrap();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::write(r.join("etc/hostname"), "web-7\n").unwrap();
        std::fs::write(
            r.join("etc/machine-id"),
            "0123456789abcdef0123456789abcdef\n",
        )
        .unwrap();
        let o = Overrides {
            instance_id: None,
            image_id: None,
            group: None,
            baked_image_id: Some("img-baked".into()),
            root: r,
        };
        let id = discover(&o);
        assert!(id.instance_id.starts_with("web-7-"), "{}", id.instance_id);
        assert!(
            !id.instance_id.contains("0123456789abcdef"),
            "machine-id must not leak"
        );
        assert_eq!(id.instance_id, discover(&o).instance_id, "stable");
        assert_eq!(id.image_id, "img-baked");
        std::fs::write(
            r.join("run/cloud-init/instance-data.json"),
            r#"{"v1":{"instance_id":"i-0abc"},"ds":{"meta_data":{"ami-id":"ami-123"}}}"#,
        )
        .unwrap();
        let id = discover(&o);
        assert_eq!(
            (id.instance_id.as_str(), id.image_id.as_str()),
            ("i-0abc", "ami-123")
        );
        let o = Overrides {
            instance_id: Some("i-flag"),
            group: Some("web"),
            ..o
        };
        let id = discover(&o);
        assert_eq!(id.instance_id, "i-flag");
        assert_eq!(id.group.as_deref(), Some("web"));
    }
}
