//! `services rollback NAME [--to N]`: makes an older release's spec the newest release.

use std::sync::Arc;

use crate::api::auth::{Principal, Scope};
use crate::api::error::ApiError;
use crate::app::{Control, blocking};
use crate::command::execute::{Answer, define_service};

use super::{fold_releases, service_aggregate};

/// Defines release `to` (default: the one before the newest) again, as release N+1.
pub async fn rollback_service(
    control: &Control,
    principal: &Principal,
    name: String,
    to: Option<u64>,
) -> Result<Answer, ApiError> {
    let org = principal.require(Scope::ServicesWrite)?.to_string();
    {
        let views = control.projector.views();
        // Another org's service of that name is not found either (P4).
        if views.service(&org, &name).is_none() {
            return Err(crate::audit::not_found_here(
                control, &views, principal, "service", &name,
            ));
        }
    }
    let store = Arc::clone(&control.store);
    let aggregate = service_aggregate(&org, &name);
    let history = blocking(move || Ok(store.read_aggregate(&aggregate)?)).await?;
    let releases = fold_releases(&history).map_err(ApiError::internal)?;
    let newest = releases.last().map_or(0, |r| r.release);
    let target = to.unwrap_or(newest.saturating_sub(1));
    let release = releases
        .iter()
        .find(|r| r.release == target)
        .ok_or_else(|| {
            ApiError::unprocessable(
                "to",
                if newest <= 1 {
                    format!(
                        "service {name} has only release {newest}; there is nothing to roll back to"
                    )
                } else {
                    format!("service {name} has releases 1 to {newest}")
                },
                target,
            )
        })?;
    define_service(control, principal, release.spec.clone(), None).await
}
