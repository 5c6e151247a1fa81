//! A test executable whose tests share one API server: a libtest-mimic main (libtest's
//! arguments and output) starts the server before the selected tests and stops it after them.
use std::{future::Future, pin::Pin, process::ExitCode, sync::Arc, time::Instant};

use anyhow::Result;
use libtest_mimic::{Arguments, Failed, Trial};

use super::KubeServer;

/// One test: given the shared server.
pub type TestFn = fn(Arc<KubeServer>) -> Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// `[(name, TestFn)]` from the names of `async fn(Arc<KubeServer>) -> Result<()>` tests.
#[macro_export]
macro_rules! kube_tests {
    ($($name:ident),* $(,)?) => {
        [$((stringify!($name), (|s| Box::pin($name(s))) as $crate::kube::TestFn)),*]
    };
}

/// Runs `tests` against one server that `start` makes (`None`: no binaries, outside CI).
/// Listing the tests, a filter that selects none of them, or `runnable` false (e.g. not
/// root) start no server; the selected tests then show as ignored, never as passed.
pub fn run<F>(
    tests: impl IntoIterator<Item = (&'static str, TestFn)>,
    runnable: impl FnOnce() -> bool,
    start: impl FnOnce() -> F,
) -> ExitCode
where
    F: Future<Output = Result<Option<KubeServer>>>,
{
    let args = Arguments::from_args();
    let tests: Vec<_> = tests.into_iter().collect();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let selected = |name: &str| {
        let by_filter = args.filter.as_deref().is_none_or(|f| {
            if args.exact {
                name == f
            } else {
                name.contains(f)
            }
        });
        by_filter && !args.skip.iter().any(|s| name.contains(s.as_str()))
    };
    let wanted = !args.list && tests.iter().any(|(name, _)| selected(name)) && runnable();
    let server = if wanted {
        let started = Instant::now();
        match runtime.block_on(start()) {
            Ok(s) => {
                if s.is_some() {
                    eprintln!("kube-apiserver and etcd ready in {:.1?}", started.elapsed());
                }
                s.map(Arc::new)
            }
            Err(e) => {
                eprintln!("error: starting the test kube-apiserver: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let handle = runtime.handle().clone();
    let trials = tests
        .into_iter()
        .map(|(name, test)| {
            let server = server.clone();
            let handle = handle.clone();
            let ignored = server.is_none() && !args.list && selected(name);
            Trial::test(name, move || {
                let Some(server) = server else {
                    return Ok(());
                };
                handle
                    .block_on(test(server))
                    .map_err(|e| Failed::from(format!("{e:#}")))
            })
            .with_ignored_flag(ignored)
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    drop(server);
    drop(runtime);
    conclusion.exit_code()
}
