//! The invariants checked after every step, and the failure report.

use super::*;

impl Sim {
    pub(super) fn end_step(&mut self) {
        self.steps += 1;
        self.check();
    }

    pub(super) fn check(&self) {
        let cfg = &self.cfg.relay;
        let now = self.now;
        let mut per_shard = vec![0usize; self.shards.len()];
        let mut phones = 0u64;
        let mut phone_bytes = 0u64;
        let mut binary_bytes = 0u64;
        for &conn in &self.open {
            let l = &self.links[&conn];
            let who = PeerId(conn);
            per_shard[l.shard] += 1;
            if let Some(t) = self.shutdown_at {
                if l.opened_at <= t && now > t + cfg.drain_timeout {
                    self.fail(format!(
                        "{who} still open after the shutdown drain deadline"
                    ));
                }
            }
            let charge = l.mirror_charge() as u64;
            match l.side {
                Side::Phone => {
                    phone_bytes += charge;
                    if l.registered {
                        phones += 1;
                    }
                }
                Side::Binary => binary_bytes += charge,
            }
            if !l.mirror.is_empty() && now > l.head_since + cfg.write_timeout {
                self.fail(format!(
                    "{who}: a write pending since {:?} outlived the write timeout",
                    l.head_since
                ));
            }
            if l.close_decided && !l.aborted && l.mirror.is_empty() {
                if let Some(since) = l.close_since {
                    if now > since + cfg.close_timeout {
                        self.fail(format!(
                            "{who}: close handshake due since {since:?} outlived the close timeout"
                        ));
                    }
                }
            }
            if l.ending {
                continue;
            }
            if let Some(since) = l.read_since {
                if now > since + cfg.read_timeout {
                    self.fail(format!(
                        "{who}: a message begun at {since:?} outlived the read timeout"
                    ));
                }
            }
            if l.paused && !self.holder_over_half(conn) {
                self.fail(format!(
                    "{who} still paused while its binary's outbox is within half its budget"
                ));
            }
            let st = &self.sids[l.sid_ix];
            let holder = st.holder == Some(conn);
            let heartbeat = (l.side == Side::Phone && l.registered && !l.paused) || holder;
            if heartbeat {
                let since = l
                    .last_pong
                    .map_or(l.active_since, |p| p.max(l.active_since));
                if let Some(t) = l.ping_unanswered {
                    if now > t + cfg.pong_timeout {
                        self.fail(format!(
                            "{who}: a ping from {t:?} unanswered past the pong timeout, still open"
                        ));
                    }
                }
                let ping_by = (since + cfg.ping_interval).max(self.last_jump);
                if now > ping_by + cfg.pong_timeout {
                    self.fail(format!(
                        "{who}: no pong since {since:?} and still open (ping interval + pong timeout passed)"
                    ));
                }
            }
            if l.side == Side::Binary && !holder && now > l.opened_at + cfg.probe_timeout {
                self.fail(format!(
                    "{who}: a claimant still waiting after the probe timeout"
                ));
            }
            if l.side == Side::Phone && l.registered && st.holder.is_none() {
                match st.holderless_since {
                    None => self.fail(format!(
                        "{who}: registered with {} that never had a binary",
                        l.sid
                    )),
                    Some(since) if now > since + cfg.grace => self.fail(format!(
                        "{who}: still registered after the grace window of {} (since {since:?})",
                        l.sid
                    )),
                    Some(_) => {}
                }
            }
        }
        for (s, relay) in self.shards.iter().enumerate() {
            if relay.connections() != per_shard[s] {
                self.fail(format!(
                    "shard{s} tracks {} connections, the runtime has {} open",
                    relay.connections(),
                    per_shard[s]
                ));
            }
        }
        let mut holders = 0u64;
        for st in &self.sids {
            for (s, relay) in self.shards.iter().enumerate() {
                if s != st.shard && relay.holder(&st.id).is_some() {
                    self.fail(format!(
                        "{} held on shard{s}, but it lives on shard{}",
                        st.id, st.shard
                    ));
                }
            }
            holders += u64::from(st.holder.is_some());
        }
        let mut c = Counters::default();
        for relay in &self.shards {
            let s = relay.counters();
            c.connected_phones += s.connected_phones;
            c.connected_binaries += s.connected_binaries;
            c.phone_outbox_bytes += s.phone_outbox_bytes;
            c.binary_outbox_bytes += s.binary_outbox_bytes;
            c.grace_expiries += s.grace_expiries;
            for (a, b) in c.frames_forwarded.iter_mut().zip(s.frames_forwarded) {
                *a += b;
            }
            for (a, b) in c.frames_dropped.iter_mut().zip(s.frames_dropped) {
                *a += b;
            }
            for (a, b) in c.ws_upgrade_attempts.iter_mut().zip(s.ws_upgrade_attempts) {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
            }
        }
        let e = &self.expect;
        let checks: [(&str, u64, u64); 11] = [
            ("connected_phones", c.connected_phones, phones),
            ("connected_binaries", c.connected_binaries, holders),
            ("phone_outbox_bytes", c.phone_outbox_bytes, phone_bytes),
            ("binary_outbox_bytes", c.binary_outbox_bytes, binary_bytes),
            (
                "client accept",
                c.upgrades(Endpoint::Client, UpgradeOutcome::Accept),
                e.phone_accepts,
            ),
            (
                "client reject_404",
                c.upgrades(Endpoint::Client, UpgradeOutcome::Reject404),
                e.phone_404,
            ),
            (
                "client reject_429",
                c.upgrades(Endpoint::Client, UpgradeOutcome::Reject429),
                e.phone_429,
            ),
            (
                "server accept",
                c.upgrades(Endpoint::Server, UpgradeOutcome::Accept),
                e.server_accepts,
            ),
            (
                "server reject_409",
                c.upgrades(Endpoint::Server, UpgradeOutcome::Reject409),
                e.server_409,
            ),
            (
                "frames_forwarded phone_to_binary",
                c.forwarded(Direction::PhoneToBinary),
                e.forwarded[Direction::PhoneToBinary as usize],
            ),
            (
                "frames_forwarded binary_to_phone",
                c.forwarded(Direction::BinaryToPhone),
                e.forwarded[Direction::BinaryToPhone as usize],
            ),
        ];
        for (name, got, want) in checks {
            if got != want {
                self.fail(format!("counter {name} is {got}, the model expects {want}"));
            }
        }
        for &r in DropReason::ALL {
            if c.dropped(r) != e.dropped[r as usize] {
                self.fail(format!(
                    "frames_dropped{{reason={}}} is {}, the model expects {}",
                    r.as_str(),
                    c.dropped(r),
                    e.dropped[r as usize]
                ));
            }
        }
        if c.grace_expiries > e.grace_entries {
            self.fail(format!(
                "{} grace expiries but only {} grace windows began",
                c.grace_expiries, e.grace_entries
            ));
        }
    }

    pub(super) fn check_one_close(&self, conn: u64) {
        let seen = self.links[&conn].closes_seen;
        if seen > 1 {
            self.fail(format!("{} saw {seen} closes", PeerId(conn)));
        }
    }

    /// Reports a violated invariant with everything needed to replay it.
    pub(super) fn fail(&self, msg: String) -> ! {
        let replay = self.cfg.replay_command.clone().unwrap_or_else(|| {
            format!(
                "SWITCHYARD_SIM_SEED={} cargo test -p switchyard-sim --test seeds -- replay",
                self.cfg.seed
            )
        });
        if let Some(lines) = self.trace.lines() {
            eprintln!("switchyard-sim: full trace of seed {}:", self.cfg.seed);
            for line in lines {
                eprintln!("{line}");
            }
        }
        let mut tail = String::new();
        for line in self.trace.tail() {
            tail.push_str("    ");
            tail.push_str(line);
            tail.push('\n');
        }
        panic!(
            "switchyard-sim: invariant violated at {:?} (seed {}, step {}): {msg}\n  replay: {replay}\n  last trace lines:\n{tail}",
            self.now, self.cfg.seed, self.steps
        );
    }
}
