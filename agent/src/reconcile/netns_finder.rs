//! Finding running pods' network namespaces through `/proc` (`k8s::procscan`), batched: every
//! request that arrives while a scan runs goes into the next one, so labelling a namespace of
//! a hundred pods costs a few scans of `/proc`, not a hundred.
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::k8s::procscan::{FoundNetns, PodToFind, ProcScanner, Refusal};

/// What one scan found for one pod.
#[derive(Debug)]
pub enum Found {
    Netns(FoundNetns),
    /// No process of the pod runs in a netns holding all its IPs; these namespaces were its
    /// processes' but lacked some (empty: none of its processes runs at all).
    Nothing(Vec<Refusal>),
}

type Request = (PodToFind, oneshot::Sender<Result<Found, String>>);

#[derive(Clone)]
pub struct NetnsFinder {
    tx: mpsc::UnboundedSender<Request>,
}

impl NetnsFinder {
    /// Starts the scanning task (it ends when every `NetnsFinder` is dropped).
    pub fn start(scanner: ProcScanner) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(serve(scanner, rx));
        NetnsFinder { tx }
    }

    pub async fn find(&self, pod: PodToFind) -> Result<Found, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((pod, tx))
            .map_err(|_| "the /proc scanner stopped".to_string())?;
        rx.await
            .map_err(|_| "the /proc scanner stopped".to_string())?
    }
}

async fn serve(scanner: ProcScanner, mut rx: mpsc::UnboundedReceiver<Request>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let pods: Vec<PodToFind> = batch.iter().map(|(p, _)| p.clone()).collect();
        let scanner = scanner.clone();
        let result = tokio::task::spawn_blocking(move || scanner.find(&pods)).await;
        let mut result = match result {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                warn!(error = %e, "scanning /proc");
                answer_all(batch, format!("scanning /proc: {e}"));
                continue;
            }
            Err(e) => {
                answer_all(batch, format!("scanning /proc: {e}"));
                continue;
            }
        };
        for (pod, reply) in batch {
            let found = match result.found.remove(&pod.uid) {
                Some(ns) => Found::Netns(ns),
                None => Found::Nothing(
                    result
                        .refused
                        .iter()
                        .filter(|r| r.uid == pod.uid)
                        .cloned()
                        .collect(),
                ),
            };
            let _ = reply.send(Ok(found));
        }
    }
}

fn answer_all(batch: Vec<Request>, error: String) {
    for (_, reply) in batch {
        let _ = reply.send(Err(error.clone()));
    }
}
