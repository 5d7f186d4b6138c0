//! The artifact commands: recording an uploaded (already verified and published) artifact for
//! an org, and removing an org's hold on one, refused while a release of one of the org's
//! services references it.

use outpost_proto::artifact::ArtifactInfo;

use crate::api::auth::{Principal, Scope};
use crate::api::error::ApiError;
use crate::app::{Control, blocking};
use crate::command::execute::Answer;
use crate::log::Event;
use crate::store::Commit;

/// Records `sha256` for the caller's org (a second push of the same bytes renames it).
pub async fn record_artifact(
    control: &Control,
    principal: &Principal,
    sha256: String,
    size_bytes: u64,
    name: String,
) -> Result<Answer, ApiError> {
    let org = principal.require(Scope::ServicesWrite)?.to_string();
    let guard = control.lock_commands().await;
    let known = control.projector.views().artifacts.held_by(&org, &sha256);
    if let Some(info) = known
        && info.name == name
    {
        return Ok(Answer::Artifact(info));
    }
    let commit = Commit {
        events: vec![
            Event::ArtifactStored {
                org: org.clone(),
                sha256: sha256.clone(),
                size_bytes,
                name: name.clone(),
            }
            .to_new_event(),
        ],
        ..Commit::default()
    };
    let outcome = control.commit(guard, commit).await?;
    let event_id = outcome.last_event_id().unwrap_or_default();
    let _ = control
        .projector
        .wait_for(event_id, control.settings.projection_wait)
        .await;
    Ok(Answer::Artifact(
        control
            .projector
            .views()
            .artifacts
            .held_by(&org, &sha256)
            .unwrap_or(ArtifactInfo {
                sha256,
                size_bytes,
                name,
                stored_at_unix_ms: 0,
            }),
    ))
}

/// Removes the caller's org's hold on `sha256`, and the bytes once no org holds them.
pub async fn remove_artifact(
    control: &Control,
    principal: &Principal,
    sha256: String,
) -> Result<Answer, ApiError> {
    let org = principal.require(Scope::ServicesWrite)?.to_string();
    let guard = control.lock_commands().await;
    {
        let views = control.projector.views();
        if views.artifacts.held_by(&org, &sha256).is_none() {
            return Err(crate::audit::not_found_here(
                control, &views, principal, "artifact", &sha256,
            ));
        }
        let services: Vec<String> = views.releases.services_referencing(&org, &sha256);
        if let Some(first) = services.first() {
            return Err(ApiError::InUse {
                field: "sha256",
                value: sha256.clone(),
                message: format!(
                    "artifact {sha256} is referenced by a release of service {first}{}; delete the service first",
                    if services.len() > 1 {
                        format!(
                            " (and {} more: {})",
                            services.len() - 1,
                            services[1..].join(", ")
                        )
                    } else {
                        String::new()
                    }
                ),
            });
        }
    }
    let commit = Commit {
        events: vec![
            Event::ArtifactRemoved {
                org,
                sha256: sha256.clone(),
            }
            .to_new_event(),
        ],
        ..Commit::default()
    };
    let outcome = control.commit(guard, commit).await?;
    let event_id = outcome.last_event_id().unwrap_or_default();
    let _ = control
        .projector
        .wait_for(event_id, control.settings.projection_wait)
        .await;
    if !control.projector.views().artifacts.is_held(&sha256)
        && let Some(store) = control.settings.artifacts.blob_store()
    {
        let sha = sha256.clone();
        blocking(move || Ok(store.remove(&sha)?)).await?;
    }
    Ok(Answer::Event(crate::api::views::EventIdAnswer { event_id }))
}
