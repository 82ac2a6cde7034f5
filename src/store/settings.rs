//! A tenant's settings for its CI service, checked field by field.
//!
//! Settings arrive as JSON (from the API) and are stored as JSON text. Both ways go through
//! [`TenantSettings::parse`], so what is stored is always what the checks accept, and every
//! error names its field as `settings.installation_id`. Secrets (a GitHub App's private key,
//! an Azure token) are not settings: they go to the tenant's sealed secrets, under the names
//! in [`secret_names`].

use serde::Serialize;
use serde_json::{Map, Value};

use super::{StoreError, TenantKind};

/// The longest URL a setting may hold.
const MAX_URL_LEN: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum TenantSettings {
    Github(GithubSettings),
    Azure(AzureSettings),
    Local(LocalSettings),
}

/// The names of the sealed secrets a tenant's CI service needs.
pub mod secret_names {
    /// The secret that signs a GitHub tenant's webhook deliveries.
    pub const GITHUB_WEBHOOK: &str = "webhook_secret";
    /// A GitHub App's private key (PEM), for tenants with `app_id`.
    pub const GITHUB_APP_KEY: &str = "app_private_key";
    /// A fine-grained personal access token, for tenants without `app_id`.
    pub const GITHUB_TOKEN: &str = "token";
}

/// A GitHub organisation (or user), one repository, or an enterprise, reached through a GitHub
/// App installation or a fine-grained token.
///
/// Exactly one scope: `owner` alone (an organisation), `owner` and `repository`, or
/// `enterprise`. With `app_id` and `installation_id` the App's private key is the secret
/// `app_private_key`; without them the secret `token` is used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct GithubSettings {
    /// The account (organisation or user) the runners register with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Set when the tenant is one repository of `owner` rather than all of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// The enterprise's slug, for an enterprise tenant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enterprise: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub installation_id: Option<u64>,
    /// The API root of a GitHub Enterprise Server; github.com's when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
    /// The runner group the tenant's runners join; 1, the default group, when absent.
    pub runner_group_id: u64,
    /// The labels the tenant's jobs may ask for; any pool's labels when empty.
    #[serde(default)]
    pub labels: Vec<String>,
}

/// Where a GitHub tenant's runners register.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GithubScope {
    Organization(String),
    Repository(String, String),
    Enterprise(String),
}

impl GithubSettings {
    pub fn scope(&self) -> GithubScope {
        match (&self.enterprise, &self.owner, &self.repository) {
            (Some(enterprise), _, _) => GithubScope::Enterprise(enterprise.clone()),
            (None, Some(owner), Some(repository)) => {
                GithubScope::Repository(owner.clone(), repository.clone())
            }
            (None, Some(owner), None) => GithubScope::Organization(owner.clone()),
            (None, None, _) => unreachable!("parse_github requires owner or enterprise"),
        }
    }
}

/// An Azure DevOps organisation and the agent pool whose jobs the host takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AzureSettings {
    /// As `https://dev.azure.com/contoso`.
    pub organization_url: String,
    pub agent_pool: String,
}

/// A local tenant's jobs are commands sent through the API: there is nothing to set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct LocalSettings {}

impl TenantSettings {
    /// Checks `value` as the settings of a tenant of `kind`.
    pub fn parse(kind: TenantKind, value: &Value) -> Result<TenantSettings, StoreError> {
        match kind {
            TenantKind::Github => parse_github(value).map(TenantSettings::Github),
            TenantKind::Azure => parse_azure(value).map(TenantSettings::Azure),
            TenantKind::Local => {
                Fields::of(value, &[])?;
                Ok(TenantSettings::Local(LocalSettings {}))
            }
        }
    }

    pub fn kind(&self) -> TenantKind {
        match self {
            TenantSettings::Github(_) => TenantKind::Github,
            TenantSettings::Azure(_) => TenantKind::Azure,
            TenantSettings::Local(_) => TenantKind::Local,
        }
    }

    pub(super) fn to_json_text(&self) -> String {
        serde_json::to_string(self).expect("settings serialise to JSON")
    }
}

fn parse_github(value: &Value) -> Result<GithubSettings, StoreError> {
    let fields = Fields::of(
        value,
        &[
            "owner",
            "repository",
            "enterprise",
            "app_id",
            "installation_id",
            "api_url",
            "runner_group_id",
            "labels",
        ],
    )?;
    let settings = GithubSettings {
        owner: fields.string("owner")?,
        repository: fields.string("repository")?,
        enterprise: fields.string("enterprise")?,
        app_id: fields.id("app_id")?,
        installation_id: fields.id("installation_id")?,
        api_url: fields.string("api_url")?,
        runner_group_id: fields.id("runner_group_id")?.unwrap_or(1),
        labels: fields.labels("labels")?,
    };
    check_github_scope(&settings)?;
    match (settings.app_id, settings.installation_id) {
        (Some(_), None) => return Err(invalid("installation_id", "is required with app_id")),
        (None, Some(_)) => return Err(invalid("app_id", "is required with installation_id")),
        _ => {}
    }
    if let Some(url) = &settings.api_url {
        check_api_url("api_url", url)?;
    }
    Ok(settings)
}

fn check_github_scope(settings: &GithubSettings) -> Result<(), StoreError> {
    match (&settings.enterprise, &settings.owner, &settings.repository) {
        (Some(enterprise), None, None) => check_github_name("enterprise", enterprise, 60, &[]),
        (Some(_), _, _) => {
            Err(invalid("enterprise", "an enterprise tenant has no owner or repository"))
        }
        (None, None, _) => Err(invalid("owner", "is required (or enterprise)")),
        (None, Some(owner), repository) => {
            check_github_name("owner", owner, 39, &[])?;
            match repository {
                Some(repository) => check_github_name("repository", repository, 100, &['_', '.']),
                None => Ok(()),
            }
        }
    }
}

/// An API root: https, or plain http to this host only (a local proxy, or a test server).
fn check_api_url(field: &str, url: &str) -> Result<(), StoreError> {
    let loopback = ["http://127.0.0.1:", "http://[::1]:", "http://localhost:"];
    if loopback.iter().any(|prefix| url.starts_with(prefix))
        && url.len() <= MAX_URL_LEN
        && !url.chars().any(char::is_whitespace)
    {
        return Ok(());
    }
    check_https_url(field, url)
}

fn parse_azure(value: &Value) -> Result<AzureSettings, StoreError> {
    let fields = Fields::of(value, &["organization_url", "agent_pool"])?;
    let settings = AzureSettings {
        organization_url: fields.required_string("organization_url")?,
        agent_pool: fields.required_string("agent_pool")?,
    };
    check_https_url("organization_url", &settings.organization_url)?;
    let pool = &settings.agent_pool;
    if pool.is_empty() || pool.len() > 256 || pool.chars().any(char::is_control) {
        return Err(invalid(
            "agent_pool",
            "must be 1 to 256 characters without control characters",
        ));
    }
    Ok(settings)
}

/// GitHub account and repository names: letters, digits, `-` and the `extra` characters.
fn check_github_name(
    field: &str,
    name: &str,
    max_len: usize,
    extra: &[char],
) -> Result<(), StoreError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-' || extra.contains(&c);
    let plain = name.chars().all(allowed) && !name.starts_with('-') && name != "." && name != "..";
    if name.is_empty() || name.len() > max_len || !plain {
        return Err(invalid(field, format!("`{name}` is not a GitHub {field} name")));
    }
    Ok(())
}

fn check_https_url(field: &str, url: &str) -> Result<(), StoreError> {
    let host = url.strip_prefix("https://").unwrap_or_default();
    if host.is_empty() || url.len() > MAX_URL_LEN || url.chars().any(|c| c.is_whitespace()) {
        return Err(invalid(
            field,
            format!("must be an https:// URL of at most {MAX_URL_LEN} bytes"),
        ));
    }
    Ok(())
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> StoreError {
    StoreError::invalid(format!("settings.{field}"), reason)
}

/// The members of a settings object, checked against the names a kind knows.
struct Fields<'a> {
    object: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn of(value: &'a Value, known: &[&str]) -> Result<Fields<'a>, StoreError> {
        let Value::Object(object) = value else {
            return Err(StoreError::invalid("settings", "must be a JSON object"));
        };
        if let Some(unknown) = object.keys().find(|key| !known.contains(&key.as_str())) {
            let expected = if known.is_empty() { "none".into() } else { known.join(", ") };
            return Err(invalid(unknown, format!("unknown field; known fields: {expected}")));
        }
        Ok(Fields { object })
    }

    fn string(&self, name: &str) -> Result<Option<String>, StoreError> {
        match self.object.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => Ok(Some(text.clone())),
            Some(_) => Err(invalid(name, "must be a string")),
        }
    }

    fn required_string(&self, name: &str) -> Result<String, StoreError> {
        self.string(name)?.ok_or_else(|| invalid(name, "is required"))
    }

    /// A positive integer id, as GitHub gives Apps, installations and runner groups.
    fn id(&self, name: &str) -> Result<Option<u64>, StoreError> {
        match self.object.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => match value.as_u64() {
                Some(id) if id > 0 && id <= i64::MAX as u64 => Ok(Some(id)),
                _ => Err(invalid(name, "must be a positive integer")),
            },
        }
    }

    /// Runner labels: at most 100, each 1 to 256 printable characters without commas.
    fn labels(&self, name: &str) -> Result<Vec<String>, StoreError> {
        let items = match self.object.get(name) {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(items)) if items.len() <= 100 => items,
            Some(_) => return Err(invalid(name, "must be a list of at most 100 labels")),
        };
        items
            .iter()
            .map(|item| match item.as_str() {
                Some(label)
                    if !label.is_empty()
                        && label.len() <= 256
                        && !label.contains(',')
                        && !label.chars().any(char::is_control) =>
                {
                    Ok(label.to_owned())
                }
                _ => Err(invalid(name, "labels are 1 to 256 characters, without commas")),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn github() -> Value {
        json!({ "owner": "acme", "app_id": 12, "installation_id": 34 })
    }

    fn invalid_field(kind: TenantKind, value: Value) -> String {
        match TenantSettings::parse(kind, &value) {
            Err(StoreError::Invalid { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    fn with(mut value: Value, key: &str, member: Value) -> Value {
        value[key] = member;
        value
    }

    #[test]
    fn valid_settings_of_each_kind_parse_and_round_trip() {
        let azure = json!({ "organization_url": "https://dev.azure.com/acme", "agent_pool": "ci" });
        for (kind, value) in [
            (TenantKind::Github, github()),
            (TenantKind::Azure, azure),
            (TenantKind::Local, json!({})),
        ] {
            let settings = TenantSettings::parse(kind, &value).unwrap();
            assert_eq!(settings.kind(), kind);
            let text = settings.to_json_text();
            let again = TenantSettings::parse(kind, &serde_json::from_str(&text).unwrap()).unwrap();
            assert_eq!(again, settings);
        }
    }

    #[test]
    fn github_scopes_credentials_and_defaults() {
        let parse = |value: Value| match TenantSettings::parse(TenantKind::Github, &value) {
            Ok(TenantSettings::Github(settings)) => settings,
            other => panic!("{other:?}"),
        };
        let org = parse(github());
        assert_eq!(org.scope(), GithubScope::Organization("acme".into()));
        assert_eq!((org.runner_group_id, org.labels.len()), (1, 0));
        let repo = parse(json!({ "owner": "acme", "repository": "app.rs", "runner_group_id": 7 }));
        assert_eq!(repo.scope(), GithubScope::Repository("acme".into(), "app.rs".into()));
        assert_eq!((repo.app_id, repo.runner_group_id), (None, 7), "a token tenant");
        let enterprise = parse(json!({ "enterprise": "big-co", "labels": ["Windows", "arm64"] }));
        assert_eq!(enterprise.scope(), GithubScope::Enterprise("big-co".into()));
        assert_eq!(enterprise.labels, ["Windows", "arm64"]);
        let local = parse(with(github(), "api_url", json!("http://127.0.0.1:8080/api/v3")));
        assert!(local.api_url.is_some(), "plain http to this host is allowed");
    }

    #[test]
    fn errors_name_the_bad_setting() {
        let github_kind = TenantKind::Github;
        let without_installation = json!({ "owner": "acme", "app_id": 12 });
        assert_eq!(
            invalid_field(github_kind, json!({ "owner": "acme", "enterprise": "big" })),
            "settings.enterprise"
        );
        assert_eq!(invalid_field(github_kind, json!({ "repository": "x" })), "settings.owner");
        assert_eq!(
            invalid_field(github_kind, with(github(), "labels", json!(["a,b"]))),
            "settings.labels"
        );
        assert_eq!(
            invalid_field(github_kind, with(github(), "runner_group_id", json!(-1))),
            "settings.runner_group_id"
        );
        assert_eq!(invalid_field(github_kind, without_installation), "settings.installation_id");
        assert_eq!(
            invalid_field(github_kind, with(github(), "installation_id", json!(0))),
            "settings.installation_id"
        );
        assert_eq!(
            invalid_field(github_kind, with(github(), "app_id", json!("12"))),
            "settings.app_id"
        );
        assert_eq!(
            invalid_field(github_kind, with(github(), "owner", json!("-x"))),
            "settings.owner"
        );
        assert_eq!(
            invalid_field(github_kind, with(github(), "api_url", json!("http://ghe"))),
            "settings.api_url"
        );
        assert_eq!(
            invalid_field(github_kind, with(github(), "colour", json!(1))),
            "settings.colour"
        );
        assert_eq!(invalid_field(TenantKind::Local, json!({ "x": 1 })), "settings.x");
        assert_eq!(invalid_field(TenantKind::Local, json!([])), "settings");
        assert_eq!(
            invalid_field(TenantKind::Azure, json!({ "organization_url": "https://x" })),
            "settings.agent_pool"
        );
    }
}
