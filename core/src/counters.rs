//! The figures behind `/metrics` (PROTOCOL.md §12), kept by each state machine and summed by the
//! runtime. Labels are fixed enums, never ids or tokens.

use std::time::Duration;

macro_rules! label_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $label:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub const COUNT: usize = [$($label),+].len();

            /// The metric label value.
            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $label),+ }
            }
        }
    };
}

label_enum!(
    /// `direction` of a forwarded frame.
    Direction { PhoneToBinary => "phone_to_binary", BinaryToPhone => "binary_to_phone" }
);
label_enum!(
    /// `endpoint` of an upgrade attempt; `/v2/*` count with `/v1/*`.
    Endpoint { Server => "server", Client => "client" }
);
label_enum!(
    /// `outcome` of an upgrade attempt.
    UpgradeOutcome {
        Accept => "accept",
        RejectHeaders => "reject_headers",
        Reject409 => "reject_409",
        Reject404 => "reject_404",
        Reject429 => "reject_429",
        RejectRateLimit => "reject_rate_limit",
    }
);
label_enum!(
    /// `kind` of a register failure, paired with an upgrade outcome.
    RegisterFailure {
        NoServer => "no_server",
        ServerInUse => "server_in_use",
        PhonesAtCap => "phones_at_cap",
        Ratelimit => "ratelimit",
    }
);
label_enum!(
    /// `reason` a frame the relay accepted was not delivered.
    DropReason {
        Malformed => "malformed",
        UnknownConnId => "unknown_conn_id",
        NotJson => "not_json",
        NoBinary => "no_binary",
        BinaryGone => "binary_gone",
        PhoneBacklogFull => "phone_backlog_full",
        PhoneGone => "phone_gone",
    }
);
label_enum!(
    /// `reason` of a non-101 answer on an upgrade route, by admission stage.
    RejectReason {
        Host => "host",
        RateLimit => "rate_limit",
        IpCap => "ip_cap",
        GlobalCap => "global_cap",
        HeadTooLarge => "head_too_large",
        Headers => "headers",
        Handshake => "handshake",
    }
);
label_enum!(
    /// `outcome` of a push wake (§11).
    PushOutcome {
        Sent => "sent",
        Unregistered => "unregistered",
        TokenFetchFailed => "token_fetch_failed",
        SendFailed => "send_failed",
        Dropped => "dropped",
    }
);

/// Upper bounds, in seconds, of `forward_latency_seconds` (§12).
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A fixed-bucket histogram; `buckets[i]` counts observations `<= LATENCY_BUCKETS[i]` and above
/// the previous bound (not cumulative), the last slot counts the rest.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub buckets: [u64; LATENCY_BUCKETS.len() + 1],
    pub sum_seconds: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&mut self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let slot = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[slot] += 1;
        self.sum_seconds += secs;
        self.count += 1;
    }

    fn add(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.sum_seconds += other.sum_seconds;
        self.count += other.count;
    }
}

/// Every counter and gauge of PROTOCOL.md §12, and two gauges of the runtime's own (decision A1).
/// A machine fills the cells it decides; the runtime sums the machines with [`Counters::add`] and
/// renders the result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    pub connected_binaries: u64,
    pub connected_phones: u64,
    pub phone_outbox_bytes: u64,
    pub binary_outbox_bytes: u64,
    /// TCP connections of the main listener not yet closed: heads being read, answered requests
    /// lingering (§2.1) and WebSocket connections. Kept by the runtime, which owns the sockets.
    pub open_connections: u64,
    /// Of those, the connections whose request head is still being read (stage 0, §3), which no
    /// connection cap counts: what a slowloris attack holds.
    pub pending_heads: u64,
    pub grace_expiries: u64,
    pub frames_forwarded: [u64; Direction::COUNT],
    pub frames_dropped: [u64; DropReason::COUNT],
    pub ws_upgrade_attempts: [[u64; UpgradeOutcome::COUNT]; Endpoint::COUNT],
    pub register_failures: [u64; RegisterFailure::COUNT],
    pub connections_rejected: [u64; RejectReason::COUNT],
    pub push_wakes: [u64; PushOutcome::COUNT],
    pub forward_latency: [Histogram; Direction::COUNT],
}

impl Counters {
    pub fn forwarded(&self, d: Direction) -> u64 {
        self.frames_forwarded[d as usize]
    }

    pub fn dropped(&self, r: DropReason) -> u64 {
        self.frames_dropped[r as usize]
    }

    pub fn upgrades(&self, e: Endpoint, o: UpgradeOutcome) -> u64 {
        self.ws_upgrade_attempts[e as usize][o as usize]
    }

    pub fn register_failed(&self, k: RegisterFailure) -> u64 {
        self.register_failures[k as usize]
    }

    pub fn rejected(&self, r: RejectReason) -> u64 {
        self.connections_rejected[r as usize]
    }

    pub fn push(&self, o: PushOutcome) -> u64 {
        self.push_wakes[o as usize]
    }

    /// Counts one upgrade outcome, with its paired register failure (§12).
    pub(crate) fn upgrade(&mut self, e: Endpoint, o: UpgradeOutcome) {
        self.ws_upgrade_attempts[e as usize][o as usize] += 1;
        let paired = match o {
            UpgradeOutcome::Accept | UpgradeOutcome::RejectHeaders => None,
            UpgradeOutcome::Reject404 => Some(RegisterFailure::NoServer),
            UpgradeOutcome::Reject409 => Some(RegisterFailure::ServerInUse),
            UpgradeOutcome::Reject429 => Some(RegisterFailure::PhonesAtCap),
            UpgradeOutcome::RejectRateLimit => Some(RegisterFailure::Ratelimit),
        };
        if let Some(k) = paired {
            self.register_failures[k as usize] += 1;
        }
    }

    pub(crate) fn drop_frame(&mut self, r: DropReason) {
        self.frames_dropped[r as usize] += 1;
    }

    pub(crate) fn reject(&mut self, r: RejectReason) {
        self.connections_rejected[r as usize] += 1;
    }

    /// Adds `other` into `self`, cell by cell.
    pub fn add(&mut self, other: &Counters) {
        fn add_all(a: &mut [u64], b: &[u64]) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        self.connected_binaries += other.connected_binaries;
        self.connected_phones += other.connected_phones;
        self.phone_outbox_bytes += other.phone_outbox_bytes;
        self.binary_outbox_bytes += other.binary_outbox_bytes;
        self.open_connections += other.open_connections;
        self.pending_heads += other.pending_heads;
        self.grace_expiries += other.grace_expiries;
        add_all(&mut self.frames_forwarded, &other.frames_forwarded);
        add_all(&mut self.frames_dropped, &other.frames_dropped);
        for (a, b) in self
            .ws_upgrade_attempts
            .iter_mut()
            .zip(&other.ws_upgrade_attempts)
        {
            add_all(a, b);
        }
        add_all(&mut self.register_failures, &other.register_failures);
        add_all(&mut self.connections_rejected, &other.connections_rejected);
        add_all(&mut self.push_wakes, &other.push_wakes);
        for (a, b) in self.forward_latency.iter_mut().zip(&other.forward_latency) {
            a.add(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_slots() {
        let mut h = Histogram::default();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_micros(101));
        h.observe(Duration::from_secs(11));
        assert_eq!(h.buckets[0], 1);
        assert_eq!(h.buckets[1], 1);
        assert_eq!(h.buckets[16], 1);
        assert_eq!(h.count, 3);
    }

    /// A `Counters` whose every cell holds a distinct value derived from `seed`.
    fn filled(seed: u64) -> Counters {
        let mut n = seed;
        let mut next = || {
            n += 7;
            n
        };
        let mut c = Counters {
            connected_binaries: next(),
            connected_phones: next(),
            phone_outbox_bytes: next(),
            binary_outbox_bytes: next(),
            open_connections: next(),
            pending_heads: next(),
            grace_expiries: next(),
            ..Counters::default()
        };
        c.frames_forwarded.iter_mut().for_each(|x| *x = next());
        c.frames_dropped.iter_mut().for_each(|x| *x = next());
        c.ws_upgrade_attempts
            .iter_mut()
            .flatten()
            .for_each(|x| *x = next());
        c.register_failures.iter_mut().for_each(|x| *x = next());
        c.connections_rejected.iter_mut().for_each(|x| *x = next());
        c.push_wakes.iter_mut().for_each(|x| *x = next());
        for h in &mut c.forward_latency {
            h.buckets.iter_mut().for_each(|x| *x = next());
            h.count = next();
            h.sum_seconds = next() as f64;
        }
        c
    }

    #[test]
    fn add_sums_every_cell() {
        let (a, b) = (filled(1), filled(1000));
        let mut sum = a.clone();
        sum.add(&b);
        let cells = |c: &Counters| -> Vec<f64> {
            let mut v = vec![
                c.connected_binaries,
                c.connected_phones,
                c.phone_outbox_bytes,
                c.binary_outbox_bytes,
                c.open_connections,
                c.pending_heads,
                c.grace_expiries,
            ];
            v.extend(c.frames_forwarded);
            v.extend(c.frames_dropped);
            v.extend(c.ws_upgrade_attempts.iter().flatten());
            v.extend(c.register_failures);
            v.extend(c.connections_rejected);
            v.extend(c.push_wakes);
            let mut v: Vec<f64> = v.into_iter().map(|x| x as f64).collect();
            for h in &c.forward_latency {
                v.extend(h.buckets.iter().map(|x| *x as f64));
                v.push(h.count as f64);
                v.push(h.sum_seconds);
            }
            v
        };
        let expected: Vec<f64> = cells(&a)
            .iter()
            .zip(cells(&b))
            .map(|(x, y)| x + y)
            .collect();
        assert_eq!(cells(&sum), expected);
    }

    #[test]
    fn accessors_read_their_cell() {
        let c = filled(3);
        assert_eq!(c.forwarded(Direction::BinaryToPhone), c.frames_forwarded[1]);
        assert_eq!(c.dropped(DropReason::PhoneGone), c.frames_dropped[6]);
        assert_eq!(
            c.upgrades(Endpoint::Client, UpgradeOutcome::Reject429),
            c.ws_upgrade_attempts[1][4]
        );
        assert_eq!(
            c.register_failed(RegisterFailure::Ratelimit),
            c.register_failures[3]
        );
        assert_eq!(
            c.rejected(RejectReason::Handshake),
            c.connections_rejected[6]
        );
        assert_eq!(c.push(PushOutcome::Dropped), c.push_wakes[4]);
    }

    #[test]
    fn histogram_sums_seconds() {
        let mut h = Histogram::default();
        h.observe(Duration::from_millis(250));
        h.observe(Duration::from_millis(500));
        assert!((h.sum_seconds - 0.75).abs() < 1e-12);
        assert_eq!(h.buckets[10], 1, "0.25 s falls in the 0.25 bucket");
        assert_eq!(h.buckets[11], 1, "0.5 s falls in the 0.5 bucket");
    }

    #[test]
    fn upgrade_pairs_register_failure_item_68() {
        let mut c = Counters::default();
        c.upgrade(Endpoint::Client, UpgradeOutcome::Reject404);
        c.upgrade(Endpoint::Server, UpgradeOutcome::Accept);
        assert_eq!(c.upgrades(Endpoint::Client, UpgradeOutcome::Reject404), 1);
        assert_eq!(c.register_failed(RegisterFailure::NoServer), 1);
        assert_eq!(c.register_failures.iter().sum::<u64>(), 1);
    }
}
