//! What the agent writes back to Kubernetes about a pod: the `ambient.istio.io/redirection`
//! annotation, and Events for enrollment failures a person has to act on.
//!
//! The annotation is patched through `pods/status`, as istio-cni does: that subresource may
//! change metadata too, and granting it is far narrower than granting writes to pods. Every
//! patch names the pod's UID, so a pod deleted and re-created under the same name is never
//! annotated for its predecessor: the API server refuses the patch.
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::{
    Api, Client, Resource as _, ResourceExt as _,
    api::{Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use serde_json::json;

use super::watch::PodKey;

pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";

/// The annotation's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirection {
    /// Redirected in the pod, but ztunnel has not acknowledged it yet.
    Pending,
    /// Redirected and acknowledged by ztunnel.
    Enabled,
}

impl Redirection {
    pub fn as_str(self) -> &'static str {
        match self {
            Redirection::Pending => "pending",
            Redirection::Enabled => "enabled",
        }
    }

    /// The state a pod's annotation shows (`None`: absent or a value we do not write).
    pub fn of(pod: &Pod) -> Option<Redirection> {
        match pod.annotations().get(REDIRECTION_ANNOTATION)?.as_str() {
            "pending" => Some(Redirection::Pending),
            "enabled" => Some(Redirection::Enabled),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AnnotateError {
    /// The pod is gone, or the name now belongs to another pod (another UID).
    #[error("pod {0} no longer exists")]
    Gone(PodKey),
    #[error("annotating pod {pod}: {source}")]
    Api {
        pod: PodKey,
        #[source]
        source: kube::Error,
    },
}

/// Whether `pod`'s annotation already says `want` (`None`: absent), so a reconciler can skip
/// the API call.
pub fn redirection_is(pod: &Pod, want: Option<Redirection>) -> bool {
    match want {
        Some(w) => Redirection::of(pod) == Some(w),
        None => !pod.annotations().contains_key(REDIRECTION_ANNOTATION),
    }
}

/// Sets (`Some`) or removes (`None`) the annotation on the pod `key` names. Removing it from a
/// pod that is gone succeeds: there is nothing left to correct.
pub async fn set_redirection(
    client: &Client,
    key: &PodKey,
    state: Option<Redirection>,
) -> Result<(), AnnotateError> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &key.namespace);
    // A JSON merge patch: `null` deletes the key. The UID makes the server check identity.
    let patch = json!({
        "metadata": {
            "uid": key.uid,
            "annotations": { REDIRECTION_ANNOTATION: state.map(Redirection::as_str) },
        }
    });
    match api
        .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_gone(&e) => match state {
            None => Ok(()),
            Some(_) => Err(AnnotateError::Gone(key.clone())),
        },
        Err(source) => Err(AnnotateError::Api {
            pod: key.clone(),
            source,
        }),
    }
}

/// 404, or the UID check failing: v1.20 answers 422 Invalid ("metadata.uid: field is
/// immutable"), newer servers may say 409 Conflict; both name the UID.
fn is_gone(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => {
            s.code == 404
                || ((s.code == 409 || s.code == 422)
                    && s.message.to_ascii_lowercase().contains("uid"))
        }
        _ => false,
    }
}

/// Kubernetes Events about pods (`events.k8s.io/v1`), e.g. "could not enroll: …".
/// Repeats of the same event are folded into one (kube-runtime counts them as a series).
#[derive(Clone)]
pub struct PodEvents {
    recorder: Recorder,
}

/// Reasons, in the PascalCase Kubernetes uses.
pub mod reason {
    /// The pod should be enrolled but the agent could not do it (netns not found, dataplane
    /// error, ztunnel refused it).
    pub const ENROLL_FAILED: &str = "AmbientEnrollFailed";
    /// The pod should no longer be enrolled but redirection could not be removed.
    pub const UNENROLL_FAILED: &str = "AmbientUnenrollFailed";
    /// An ambient annotation has a value that is not a boolean, so it was ignored.
    pub const BAD_ANNOTATION: &str = "AmbientAnnotationIgnored";
}

impl PodEvents {
    /// `instance` tells agents apart (the node or the agent pod's name).
    pub fn new(client: Client, instance: impl Into<String>) -> Self {
        let reporter = Reporter {
            controller: "sluice-agent".into(),
            instance: Some(instance.into()),
        };
        PodEvents {
            recorder: Recorder::new(client, reporter),
        }
    }

    /// A Warning on `pod`. `action` is what was attempted (e.g. `Enroll`).
    pub async fn warn(
        &self,
        pod: &Pod,
        action: &str,
        reason: &str,
        note: impl Into<String>,
    ) -> Result<(), kube::Error> {
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(truncate(note.into(), 1024)),
            action: action.into(),
            secondary: None,
        };
        self.recorder.publish(&event, &reference(pod)).await
    }
}

fn reference(pod: &Pod) -> ObjectReference {
    pod.object_ref(&())
}

/// Events refuse notes over 1 kB; cut on a character boundary.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max - 3;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use kube::api::ObjectMeta;

    use super::*;

    fn pod(annotation: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                annotations: annotation
                    .map(|v| [(REDIRECTION_ANNOTATION.to_string(), v.to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn reads_the_annotation() {
        assert_eq!(Redirection::of(&pod(None)), None);
        assert_eq!(
            Redirection::of(&pod(Some("pending"))),
            Some(Redirection::Pending)
        );
        assert_eq!(
            Redirection::of(&pod(Some("enabled"))),
            Some(Redirection::Enabled)
        );
        assert_eq!(Redirection::of(&pod(Some("bogus"))), None);
        assert!(redirection_is(&pod(None), None));
        assert!(!redirection_is(&pod(Some("bogus")), None));
        assert!(redirection_is(
            &pod(Some("enabled")),
            Some(Redirection::Enabled)
        ));
        assert!(!redirection_is(
            &pod(Some("pending")),
            Some(Redirection::Enabled)
        ));
    }

    #[test]
    fn long_notes_are_cut_on_a_char_boundary() {
        let s = "é".repeat(600);
        let t = truncate(s, 1024);
        assert!(t.len() <= 1024);
        assert!(t.ends_with("..."));
        assert_eq!(truncate("short".into(), 1024), "short");
    }
}
