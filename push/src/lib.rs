//! Push wake for Switchyard (PROTOCOL.md §11): wakes a sleeping phone through FCM HTTP v1 when
//! its binary asks, bounded, and never on the frame path.
//!
//! The core decides admission by its per-server-id bucket and emits
//! [`Output::PushWake`](switchyard_core::Output::PushWake); the shard hands it to the node's
//! [`Pusher`] (a [`PushSink`]). The pusher checks the node-wide in-flight cap with the core's
//! [`PushDispatcher`] and, if admitted, performs the calls on a short-lived thread of its own:
//! one thread per send in flight, never more than `--push-max-in-flight`, nothing queued. The
//! HTTP client is blocking (`ureq`), so push works the same under every runtime and a slow or
//! failing FCM only ever occupies push threads.
//!
//! Each send: an RS256 JWT signed with the service account's key is exchanged for an access
//! token (cached until 60 s before it expires, shared by all sends), then `messages:send` with
//! a data-free high-priority message. Every call has the push timeout, follows no redirect and
//! reads at most 4 KiB of the reply. The outcome is counted by the dispatcher and logged
//! (`push_wake_sent`, `push_wake_send_failed`, `push_wake_dropped`) with the device token's
//! fingerprint only (`token_fp`, [`token_fp`]).
//!
//! Shutdown ([`PushSink::cancel`]) counts every send in flight `send_failed` at once and
//! refuses later ones; a thread still blocked in a call finishes by its timeout and its result
//! is discarded.

mod fcm;
mod key;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use switchyard_core::{Config, Counters, PushDispatcher, PushOutcome, ServerId};
pub use switchyard_runtime::PushSink;

pub use fcm::{MAX_REPLY, REFRESH_MARGIN, Report, message_body};
pub use key::{ASSERTION_LIFETIME_SECS, KeyError, SCOPE, Signer, SigningKey};

/// What push needs besides the core's limits: the service account and where to call.
#[derive(Debug)]
pub struct FcmSettings {
    pub client_email: String,
    /// Becomes the JWT header's `kid` when present.
    pub private_key_id: Option<String>,
    pub private_key: SigningKey,
    /// The FCM endpoint, without a trailing `/` (`https://fcm.googleapis.com`).
    pub endpoint: String,
    /// The OAuth2 token URL; also the JWT's `aud`.
    pub token_url: String,
    pub project_id: String,
    /// Deadline of each HTTP call (`--push-timeout`).
    pub timeout: Duration,
}

/// The node's push sender. Cheap to share; hand it to the node as an `Arc<dyn PushSink>`.
#[derive(Clone)]
pub struct Pusher {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Pusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pusher").finish_non_exhaustive()
    }
}

struct Shared {
    client: fcm::Client,
    state: Mutex<State>,
    /// Mirrors `State::cancelled` for the send threads, which check it between calls.
    cancelled: AtomicBool,
}

struct State {
    dispatcher: PushDispatcher,
    /// Sends in flight by id, so shutdown can count and log them.
    live: BTreeMap<u64, Live>,
    next_id: u64,
    cancelled: bool,
}

struct Live {
    server_id: ServerId,
    token_fp: String,
}

impl Pusher {
    /// A pusher with `config`'s in-flight cap (`push_max_in_flight`).
    pub fn new(settings: FcmSettings, config: &Config) -> Pusher {
        let urls = fcm::Urls {
            send: format!(
                "{}/v1/projects/{}/messages:send",
                settings.endpoint.trim_end_matches('/'),
                settings.project_id
            ),
            token: settings.token_url,
        };
        let signer = Signer {
            client_email: settings.client_email,
            private_key_id: settings.private_key_id,
            key: settings.private_key,
        };
        Pusher {
            shared: Arc::new(Shared {
                client: fcm::Client::new(signer, urls, settings.timeout),
                state: Mutex::new(State {
                    dispatcher: PushDispatcher::new(config),
                    live: BTreeMap::new(),
                    next_id: 0,
                    cancelled: false,
                }),
                cancelled: AtomicBool::new(false),
            }),
        }
    }

    /// Sends in flight now.
    pub fn in_flight(&self) -> u32 {
        self.shared.state().dispatcher.in_flight()
    }
}

impl PushSink for Pusher {
    fn wake(&self, server_id: ServerId, token: String) {
        let token_fp = token_fp(&token);
        let mut state = self.shared.state();
        if !state.dispatcher.try_begin() {
            drop(state);
            tracing::info!(
                server_id = %server_id,
                token_fp = token_fp.as_str(),
                outcome = "dropped",
                reason = "in_flight_cap",
                "push_wake_dropped"
            );
            return;
        }
        if state.cancelled {
            state.dispatcher.finish(PushOutcome::SendFailed);
            drop(state);
            log(
                &Live {
                    server_id,
                    token_fp,
                },
                &Report::cancelled(),
            );
            return;
        }
        let id = state.next_id;
        state.next_id += 1;
        state.live.insert(
            id,
            Live {
                server_id,
                token_fp,
            },
        );
        drop(state);
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("switchyard-push".into())
            .spawn(move || {
                let report = shared.client.send(&token, &shared.cancelled);
                shared.finish(id, &report);
            });
        if spawned.is_err() {
            self.shared.finish(
                id,
                &Report::failed(PushOutcome::SendFailed, "cannot start a push thread"),
            );
        }
    }

    fn counters(&self) -> Counters {
        self.shared.state().dispatcher.counters().clone()
    }

    fn cancel(&self) {
        self.shared.cancelled.store(true, Ordering::Release);
        let cancelled = {
            let mut state = self.shared.state();
            state.cancelled = true;
            let live = std::mem::take(&mut state.live);
            for _ in 0..live.len() {
                state.dispatcher.finish(PushOutcome::SendFailed);
            }
            live
        };
        for live in cancelled.values() {
            log(live, &Report::cancelled());
        }
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts and logs the end of send `id`, unless shutdown already counted it.
    fn finish(&self, id: u64, report: &Report) {
        let live = {
            let mut state = self.state();
            let Some(live) = state.live.remove(&id) else {
                return;
            };
            state.dispatcher.finish(report.outcome);
            live
        };
        log(&live, report);
    }
}

fn log(live: &Live, report: &Report) {
    let (sid, fp) = (&live.server_id, live.token_fp.as_str());
    match report.outcome {
        PushOutcome::Sent => tracing::info!(
            server_id = %sid,
            token_fp = fp,
            fcm_message_id = report.message_id.as_deref(),
            outcome = "sent",
            "push_wake_sent"
        ),
        PushOutcome::Unregistered => tracing::info!(
            server_id = %sid,
            token_fp = fp,
            outcome = report.outcome.as_str(),
            err = report.err,
            kind = report.status.as_deref(),
            reason = report.error_code.as_deref(),
            "push_wake_send_failed"
        ),
        PushOutcome::SendFailed | PushOutcome::TokenFetchFailed | PushOutcome::Dropped => {
            tracing::warn!(
                server_id = %sid,
                token_fp = fp,
                outcome = report.outcome.as_str(),
                err = report.err,
                kind = report.status.as_deref(),
                reason = report.error_code.as_deref(),
                "push_wake_send_failed"
            );
        }
    }
}

/// The device token's fingerprint for logs (§15): the first 8 hex digits of its SHA-256.
pub fn token_fp(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_8_hex_of_sha256() {
        // SHA-256("abc") = ba7816bf…
        assert_eq!(token_fp("abc"), "ba7816bf");
    }
}
