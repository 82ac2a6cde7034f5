//! GitHub webhook deliveries: their signatures and the parts of `workflow_job` events that
//! demand needs. Everything in a delivery is untrusted until its signature checks out, and only
//! the fields read here are relied upon afterwards.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

/// Whether `header` (`X-Hub-Signature-256`, as `sha256=<hex>`) signs `body` with `secret`.
/// The comparison takes the same time wherever the first difference is.
pub fn signature_valid(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex) = header.strip_prefix("sha256=") else { return false };
    let Some(expected) = decode_hex(hex) else { return false };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any size");
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.len() != 64 {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect()
}

/// A `workflow_job` event: what happened to which job, in which repository.
#[derive(Debug, Clone, Deserialize)]
pub struct WorkflowJobEvent {
    pub action: String,
    pub workflow_job: WorkflowJob,
    pub repository: Repository,
    #[serde(default)]
    pub enterprise: Option<Account>,
    #[serde(default)]
    pub installation: Option<Installation>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WorkflowJob {
    pub id: u64,
    pub run_id: u64,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub runner_name: Option<String>,
    #[serde(default)]
    pub conclusion: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Repository {
    pub name: String,
    pub full_name: String,
    pub owner: Owner,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Owner {
    pub login: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Account {
    pub slug: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Installation {
    pub id: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn githubs_documented_signature_checks_out_and_others_do_not() {
        let secret = b"It's a Secret to Everybody";
        let header = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(signature_valid(secret, b"Hello, World!", header));
        assert!(!signature_valid(secret, b"Hello, World?", header));
        assert!(!signature_valid(b"another secret", b"Hello, World!", header));
        assert!(!signature_valid(secret, b"Hello, World!", &header.replace("sha256=", "sha1=")));
        assert!(!signature_valid(secret, b"Hello, World!", "sha256=zz"));
        assert!(!signature_valid(secret, b"Hello, World!", &format!("{header}00")));
        assert!(!signature_valid(secret, b"Hello, World!", ""));
    }

    #[test]
    fn a_workflow_job_event_parses_from_githubs_shape() {
        let body = serde_json::json!({
            "action": "queued",
            "workflow_job": {
                "id": 29679449, "run_id": 10593420, "status": "queued", "conclusion": null,
                "labels": ["self-hosted", "Windows", "ARM64"], "runner_name": null,
                "name": "build", "steps": []
            },
            "repository": {
                "id": 1, "name": "app", "full_name": "octo-org/app", "private": true,
                "owner": { "login": "octo-org", "id": 2, "type": "Organization" }
            },
            "organization": { "login": "octo-org", "id": 2 },
            "installation": { "id": 77, "node_id": "x" },
            "sender": { "login": "octocat", "id": 3, "type": "User" }
        });
        let event: WorkflowJobEvent = serde_json::from_value(body).unwrap();
        assert_eq!(event.action, "queued");
        assert_eq!(event.workflow_job.labels, ["self-hosted", "Windows", "ARM64"]);
        assert_eq!(event.repository.owner.login, "octo-org");
        assert_eq!(event.installation.map(|i| i.id), Some(77));
    }
}
