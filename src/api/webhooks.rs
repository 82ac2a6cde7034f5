//! Webhook receivers. They take no bearer token: a delivery proves itself with its signature,
//! which the provider checks before anything in it is believed.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::{ApiError, ApiState};
use crate::provider::github::{WebhookError, WebhookOutcome};

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookAnswer {
    /// `accepted` (acted upon), `ignored` (valid, nothing to do) or `duplicate` (this delivery
    /// was acted upon before).
    result: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    detail: String,
}

/// Receives GitHub's `workflow_job` and `ping` events, signed with a GitHub tenant's
/// `webhook_secret`.
#[utoipa::path(post, path = "/webhooks/github", request_body(content = Object, description = "A GitHub webhook payload"), responses(
    (status = 200, body = WebhookAnswer),
    (status = 400, description = "Malformed delivery", body = super::resources::ErrorResponse),
    (status = 401, description = "No valid X-Hub-Signature-256", body = super::resources::ErrorResponse),
    (status = 413, description = "The delivery is too large", body = super::resources::ErrorResponse),
    (status = 503, description = "The GitHub provider is not running", body = super::resources::ErrorResponse),
))]
pub async fn github(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<WebhookAnswer>, ApiError> {
    let received = std::time::Instant::now();
    let Some(provider) = state.control.github() else {
        let message = "the GitHub provider is not running";
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message));
    };
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let event = header("x-github-event").unwrap_or_default();
    let outcome = provider
        .webhook(event, header("x-github-delivery"), header("x-hub-signature-256"), &body, received)
        .await;
    let answer = match outcome {
        Ok(WebhookOutcome::Accepted(detail)) => WebhookAnswer { result: "accepted", detail },
        Ok(WebhookOutcome::Ignored(detail)) => WebhookAnswer { result: "ignored", detail },
        Ok(WebhookOutcome::Duplicate) => {
            WebhookAnswer { result: "duplicate", detail: String::new() }
        }
        Err(WebhookError::Signature) => {
            let message = WebhookError::Signature.to_string();
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message));
        }
        Err(WebhookError::Malformed(reason)) => {
            return Err(ApiError::invalid("body", format!("not a GitHub delivery: {reason}")))
        }
        Err(WebhookError::Store(e)) => return Err(e.into()),
    };
    Ok(Json(answer))
}
