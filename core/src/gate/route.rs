//! Routes of the main listener (PROTOCOL.md §2.1).

use crate::counters::Endpoint;

/// Where a request-target leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    Healthz,
    Upgrade(Upgrade),
    NotFound,
}

/// The upgrade routes; `/v2/server` is `/v1/server` (§2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Upgrade {
    Server,
    ClientV1,
    ClientV2,
}

impl Route {
    /// Routes a request-target by its path, the part before `?`, byte for byte: no decoding, no
    /// normalisation. A target not in origin form leads nowhere.
    pub(super) fn of(target: &[u8]) -> Route {
        let path = target.split(|&b| b == b'?').next().unwrap_or(target);
        match path {
            b"/healthz" => Route::Healthz,
            b"/v1/server" | b"/v2/server" => Route::Upgrade(Upgrade::Server),
            b"/v1/client" => Route::Upgrade(Upgrade::ClientV1),
            b"/v2/client" => Route::Upgrade(Upgrade::ClientV2),
            _ => Route::NotFound,
        }
    }

    pub(super) fn upgrade(self) -> Option<Upgrade> {
        match self {
            Route::Upgrade(upgrade) => Some(upgrade),
            Route::Healthz | Route::NotFound => None,
        }
    }
}

impl Upgrade {
    /// The `endpoint` label (§12); `/v2/*` count with `/v1/*`.
    pub(super) fn endpoint(self) -> Endpoint {
        match self {
            Upgrade::Server => Endpoint::Server,
            Upgrade::ClientV1 | Upgrade::ClientV2 => Endpoint::Client,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_byte_exact_ignoring_query() {
        assert_eq!(Route::of(b"/healthz"), Route::Healthz);
        assert_eq!(Route::of(b"/healthz?full=1"), Route::Healthz);
        assert_eq!(Route::of(b"/v2/server?"), Route::Upgrade(Upgrade::Server));
        assert_eq!(Route::of(b"/v1/client"), Route::Upgrade(Upgrade::ClientV1));
        assert_eq!(
            Route::of(b"/v2/client?a?b"),
            Route::Upgrade(Upgrade::ClientV2)
        );
        for other in [
            &b"/v1/server/"[..],
            b"/V1/server",
            b"/v1/%73erver",
            b"/v1/./server",
            b"//v1/server",
            b"http://host/v1/server",
            b"*",
            b"/metrics",
            b"/",
            b"",
        ] {
            assert_eq!(
                Route::of(other),
                Route::NotFound,
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
    }
}
