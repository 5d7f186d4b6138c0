//! `GET /v1/audit?since_unix_ms=N` (scope `audit:read`): the security-relevant acts since a
//! time, oldest first, with their actors. A tenant sees its own org's acts and refusals; the
//! `default` org (the cluster operator) sees every org's and the cluster's.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use super::{AuditEntry, entry_of};
use crate::api::auth::Scope;
use crate::api::error::ApiError;
use crate::api::extract::ApiQuery;
use crate::app::{Control, blocking};

/// Most entries one answer holds (the newest are kept).
pub const AUDIT_ENTRIES_MAX: usize = 10_000;
/// Events read from the store per page while scanning the log.
const SCAN_PAGE: usize = 2_000;

pub async fn audit_handler(
    State(control): State<Arc<Control>>,
    ApiQuery(query): ApiQuery<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = crate::api::authenticate(&control, &headers).await?;
    let org = principal.require(Scope::AuditRead)?.to_string();
    let since_unix_ms = match query.get("since_unix_ms") {
        Some(text) => text.parse::<u64>().map_err(|_| {
            ApiError::invalid("since_unix_ms", "expected milliseconds since 1970", text)
        })?,
        None => 0,
    };
    let everything = org == crate::init::DEFAULT_ORG;
    let visible = move |entry: &AuditEntry| everything || entry.org.as_deref() == Some(&org);
    let store = Arc::clone(&control.store);
    let head = control.hub.position().head;
    let mut entries: Vec<AuditEntry> = blocking(move || {
        let mut entries = std::collections::VecDeque::new();
        let mut after = 0;
        while after < head {
            let page = store.read_log(after, SCAN_PAGE)?;
            let Some(last) = page.last() else { break };
            after = last.event_id;
            for event in page.iter().filter(|e| e.at_unix_ms >= since_unix_ms) {
                if let Some(entry) = entry_of(event).filter(&visible) {
                    if entries.len() == AUDIT_ENTRIES_MAX {
                        entries.pop_front();
                    }
                    entries.push_back(entry);
                }
            }
        }
        Ok(Vec::from(entries))
    })
    .await?;
    let caller_org = principal.org();
    entries.extend(
        control
            .refusals
            .all()
            .iter()
            .filter(|r| r.last_at_unix_ms >= since_unix_ms)
            .filter(|r| caller_org == crate::init::DEFAULT_ORG || r.org == caller_org)
            .map(super::Refusal::entry),
    );
    entries.sort_by_key(|e| (e.at_unix_ms, e.event_id));
    Ok(axum::Json(entries).into_response())
}
