//! The node's phase (ready, draining, closing) and the signals that move it.

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Serving; takes new clients.
    Ready,
    /// Shutting down: `/readyz` is 503 and no new session starts; open
    /// sessions continue until the grace period ends.
    Draining,
    /// Open sessions are being closed with 1001.
    Closing,
}

#[derive(Debug, Clone)]
pub struct Lifecycle {
    phase: watch::Sender<Phase>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle::new()
    }
}

impl Lifecycle {
    pub fn new() -> Lifecycle {
        Lifecycle {
            phase: watch::Sender::new(Phase::Ready),
        }
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub fn set(&self, phase: Phase) {
        self.phase.send_replace(phase);
    }

    pub fn watch(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Completes once the node starts draining.
    pub async fn draining(&self) {
        let mut rx = self.watch();
        let _ = rx.wait_for(|p| *p != Phase::Ready).await;
    }
}

/// Completes on the first SIGTERM or SIGINT.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    // The handlers are installed here, before the caller starts serving:
    // a SIGTERM that arrives early still drains instead of killing.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}
