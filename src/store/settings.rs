//! A tenant's settings for its CI service, checked field by field.
//!
//! Settings arrive as JSON (from the API) and are stored as JSON text. Both ways go through
//! [`TenantSettings::parse`], so what is stored is always what the checks accept, and every
//! error names its field as `settings.installation_id`. Secrets (a GitHub App's private key,
//! an Azure token) are not settings: they go to the tenant's sealed secrets.

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

/// A GitHub organisation, user or enterprise, or one repository of it, reached through a
/// GitHub App installation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct GithubSettings {
    /// The account the App is installed on.
    pub owner: String,
    /// Set when the tenant is one repository of `owner` rather than all of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    pub app_id: u64,
    pub installation_id: u64,
    /// The API root of a GitHub Enterprise Server; github.com's when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
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
    let fields =
        Fields::of(value, &["owner", "repository", "app_id", "installation_id", "api_url"])?;
    let settings = GithubSettings {
        owner: fields.required_string("owner")?,
        repository: fields.string("repository")?,
        app_id: fields.required_id("app_id")?,
        installation_id: fields.required_id("installation_id")?,
        api_url: fields.string("api_url")?,
    };
    check_github_name("owner", &settings.owner, 39, &[])?;
    if let Some(repository) = &settings.repository {
        check_github_name("repository", repository, 100, &['_', '.'])?;
    }
    if let Some(url) = &settings.api_url {
        check_https_url("api_url", url)?;
    }
    Ok(settings)
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

    /// A positive integer id, as GitHub gives Apps and installations.
    fn required_id(&self, name: &str) -> Result<u64, StoreError> {
        match self.object.get(name) {
            None | Some(Value::Null) => Err(invalid(name, "is required")),
            Some(value) => match value.as_u64() {
                Some(id) if id > 0 && id <= i64::MAX as u64 => Ok(id),
                _ => Err(invalid(name, "must be a positive integer")),
            },
        }
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
    fn errors_name_the_bad_setting() {
        let github_kind = TenantKind::Github;
        let without_installation = json!({ "owner": "acme", "app_id": 12 });
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
