//! The reference model: what the core must do and count, derived from what the simulated
//! runtime fed it and saw come out, and PROTOCOL.md §6 (registry), §8 (notices), §10 (outboxes).

use super::*;

impl Sim {
    pub(super) fn drop_frame(&mut self, reason: DropReason, n: u64) {
        self.expect.dropped[reason as usize] += n;
    }

    /// Decides, before the shard sees `input`, what it must count.
    pub(super) fn account(&mut self, conn: u64, input: &Input, seq: Option<u64>) {
        match input {
            Input::Message { data, .. } => self.account_message(conn, data),
            Input::Pong { .. } => {
                let now = self.now;
                let link = self.links.get_mut(&conn).expect("known");
                if !link.ending {
                    link.last_pong = Some(now);
                    link.ping_unanswered = None;
                    link.last_heard = Some(now);
                    self.model_heard(conn);
                }
            }
            Input::Written { .. } => {
                let now = self.now;
                let link = self.links.get_mut(&conn).expect("known");
                let seq = seq.expect("a write carries its message");
                let front = link.mirror.front().copied();
                match front {
                    Some(m) if m.seq == seq => {
                        link.mirror.pop_front();
                        if link.mirror.is_empty() {
                            if link.ending && !link.aborted {
                                link.close_since = Some(now);
                            }
                        } else {
                            link.head_since = now;
                        }
                        if m.frame {
                            let dir = match link.side {
                                Side::Binary => Direction::PhoneToBinary,
                                Side::Phone => Direction::BinaryToPhone,
                            };
                            self.expect.forwarded[dir as usize] += 1;
                        }
                    }
                    Some(m) if m.seq < seq => self.fail(format!(
                        "{}: message {seq} written before message {}",
                        PeerId(conn),
                        m.seq
                    )),
                    // A message the core had already given up (discarded after it started).
                    _ => {}
                }
            }
            Input::Closed { ended, .. } => {
                if !self.links[&conn].ending {
                    let code = match ended {
                        Ended::PeerClose(Some(c)) => {
                            CloseCode::new(*c).map_or(1002, CloseCode::get)
                        }
                        Ended::PeerClose(None) => 1005,
                        Ended::Dropped | Ended::Local => 1001,
                    };
                    self.phone_ends(conn, Some(code));
                    if self.links[&conn].side == Side::Binary {
                        self.binary_ends(conn);
                    }
                }
                let link = self.links.get_mut(&conn).expect("known");
                link.ending = true;
                link.relay_closed = true;
                link.queue.clear();
                link.held.clear();
                let lost = link.mirror_frames();
                link.mirror.clear();
                let side = link.side;
                self.open.remove(&conn);
                match side {
                    Side::Binary => self.drop_frame(DropReason::BinaryGone, lost),
                    Side::Phone => self.drop_frame(DropReason::PhoneGone, lost),
                }
            }
            Input::MessageStarted { .. } => {
                let now = self.now;
                if !self.links[&conn].ending {
                    self.model_heard(conn);
                }
                let link = self.links.get_mut(&conn).expect("known");
                if !link.ending {
                    link.last_heard = Some(now);
                    link.reading_msg = true;
                    if !link.paused && link.read_since.is_none() {
                        link.read_since = Some(now);
                    }
                }
            }
            Input::Ping { .. } => {
                let now = self.now;
                let link = self.links.get_mut(&conn).expect("known");
                if !link.ending {
                    link.last_heard = Some(now);
                    self.model_heard(conn);
                }
            }
            Input::Violation { violation, .. } => self.account_violation(conn, *violation),
            Input::Open { .. } | Input::Rebalance | Input::Shutdown => {}
        }
    }

    pub(super) fn account_violation(&mut self, conn: u64, violation: Violation) {
        let link = &self.links[&conn];
        if link.ending {
            return;
        }
        let holder = self.sids[link.sid_ix].holder == Some(conn);
        let (code, reason) = match (violation, link.side) {
            (Violation::TooBig, _) => (1009, "message too big"),
            (Violation::InvalidUtf8, Side::Phone) => (1007, "frame is not JSON"),
            (Violation::InvalidUtf8, Side::Binary) => (1007, "invalid utf-8"),
            (Violation::Protocol, _) => (1002, "Protocol violation"),
        };
        if violation == Violation::InvalidUtf8 && link.side == Side::Phone {
            self.drop_frame(DropReason::NotJson, 1);
        }
        self.expect_close(conn, code, reason, holder);
    }

    pub(super) fn account_message(&mut self, conn: u64, data: &Bytes) {
        let link = self.links.get_mut(&conn).expect("known");
        if link.ending {
            return;
        }
        link.reading_msg = false;
        link.read_since = None;
        if data.len() > self.cfg.relay.max_message_size {
            let holder = self.sids[link.sid_ix].holder == Some(conn);
            return self.expect_close(conn, 1009, "message too big", holder);
        }
        let now = self.now;
        link.last_heard = Some(now);
        self.model_heard(conn);
        let link = &self.links[&conn];
        let holder = self.sids[link.sid_ix].holder;
        match link.side {
            Side::Phone => {
                if holder.is_none() {
                    self.expect_close(conn, 1000, "", false);
                    return self.drop_frame(DropReason::NoBinary, 1);
                }
                if serde_json::from_slice::<serde::de::IgnoredAny>(data).is_err() {
                    self.expect_close(conn, 1007, "frame is not JSON", false);
                    return self.drop_frame(DropReason::NotJson, 1);
                }
                let mut env = Vec::with_capacity(data.len() + link.conn_id.len() + 24);
                env.extend_from_slice(br#"{"conn_id":""#);
                env.extend_from_slice(json_escape(&link.conn_id).as_bytes());
                env.extend_from_slice(br#"","frame":"#);
                env.extend_from_slice(json_trim(data));
                env.push(b'}');
                self.links
                    .get_mut(&conn)
                    .expect("known")
                    .p2b
                    .push(env.into());
            }
            Side::Binary => {
                if holder != Some(conn) {
                    return self.drop_frame(DropReason::NoBinary, 1);
                }
                let sid = link.sid.clone();
                let (conn_id, frame, close) = match BinaryMessage::parse(data) {
                    Err(_) => return self.drop_frame(DropReason::Malformed, 1),
                    Ok(BinaryMessage::PushWake { .. } | BinaryMessage::PushInvalid) => return,
                    Ok(BinaryMessage::Deliver {
                        conn_id,
                        frame,
                        close,
                    }) => (conn_id.into_owned(), frame, close.map(CloseCode::get)),
                };
                let target = self.by_conn_id.get(&conn_id).copied().filter(|p| {
                    let l = &self.links[p];
                    l.side == Side::Phone && l.registered && !l.relay_closed && l.sid == sid
                });
                let Some(phone) = target else {
                    return self.drop_frame(DropReason::UnknownConnId, 1);
                };
                let budget = self.cfg.relay.phone_outbox_bytes;
                let p = self.links.get_mut(&phone).expect("known");
                if p.ending {
                    return self.drop_frame(DropReason::PhoneGone, 1);
                }
                let payload = frame.as_ref().map_or(0, Bytes::len);
                if p.mirror_charge() + payload + ITEM_OVERHEAD > budget {
                    let lost = p.mirror_frames() + 1;
                    p.mirror.clear();
                    let (code, reason) = close.map_or((1011, "phone backlog full"), |c| (c, ""));
                    self.expect_close(phone, code, reason, true);
                    return self.drop_frame(DropReason::PhoneBacklogFull, lost);
                }
                if let Some(frame) = frame {
                    p.b2p.push(frame);
                }
                if let Some(code) = close {
                    self.expect_close(phone, code, "", false);
                }
            }
        }
    }

    pub(super) fn expect_close(
        &mut self,
        conn: u64,
        code: u16,
        reason: &'static str,
        discard: bool,
    ) {
        self.links.get_mut(&conn).expect("known").expected_close = Some((code, reason, discard));
        self.expecting.push(conn);
    }

    /// A phone's end is decided or reported; `code` is the notice §8 gives this way of ending.
    pub(super) fn phone_ends(&mut self, conn: u64, code: Option<u16>) {
        let link = &self.links[&conn];
        if link.side != Side::Phone || !link.registered || link.ending || self.shutdown_at.is_some()
        {
            return;
        }
        let (Some(code), Some(binary)) = (code, link.notify) else {
            return;
        };
        if !self.links[&binary].ending {
            self.expected_notices.push((binary, conn, code));
        }
    }

    pub(super) fn on_output(&mut self, shard: usize, out: Output) {
        self.trace.push(
            self.now,
            format_args!("shard{shard}"),
            format_args!("{}", describe_output(&out)),
        );
        let conn = match &out {
            Output::Send { conn, .. }
            | Output::Ping { conn }
            | Output::Close { conn, .. }
            | Output::Abort { conn }
            | Output::PauseReading { conn, .. } => conn.0,
            Output::PushWake { .. } => return,
        };
        let Some(link) = self.links.get(&conn) else {
            self.fail(format!("output for unknown connection {}", PeerId(conn)));
        };
        if link.relay_closed {
            self.fail(format!(
                "output for {} after it was reported closed",
                PeerId(conn)
            ));
        }
        if link.shard != shard {
            self.fail(format!(
                "shard{shard} commands {}, which lives on shard{}",
                PeerId(conn),
                link.shard
            ));
        }
        match out {
            Output::Send { data, .. } => self.on_send(conn, data),
            Output::Ping { .. } => {
                if link.ending {
                    self.fail(format!(
                        "ping to {} after its end was decided",
                        PeerId(conn)
                    ));
                }
                let (now, probe) = (self.now, self.claiming);
                let link = self.links.get_mut(&conn).expect("known");
                if !probe && link.ping_unanswered.is_none() {
                    link.ping_unanswered = Some(now);
                }
                link.queue.push_back(Down::Ping);
                self.pump(conn);
            }
            Output::Close {
                code,
                reason,
                discard_queued,
                ..
            } => self.on_close(conn, code.get(), reason, discard_queued),
            Output::Abort { .. } => {
                if link.aborted {
                    self.fail(format!("{} aborted twice", PeerId(conn)));
                }
                let cfg = &self.cfg.relay;
                let now = self.now;
                let close_due = link.close_decided
                    && link.mirror.is_empty()
                    && link
                        .close_since
                        .is_some_and(|t| now >= t + cfg.close_timeout);
                let write_due =
                    !link.mirror.is_empty() && now >= link.head_since + cfg.write_timeout;
                let drain_due = self
                    .shutdown_at
                    .is_some_and(|t| now >= t + cfg.drain_timeout);
                if !close_due && !write_due && !drain_due {
                    self.fail(format!(
                        "{} aborted with neither a write nor a close handshake overdue",
                        PeerId(conn)
                    ));
                }
                if !link.ending {
                    self.phone_ends(conn, Some(1011));
                    if self.links[&conn].side == Side::Binary {
                        self.binary_ends(conn);
                    }
                }
                let lat = self.latency();
                let now = self.now;
                let link = self.links.get_mut(&conn).expect("known");
                link.ending = true;
                link.aborted = true;
                link.queue.clear();
                link.held.clear();
                link.epoch += 1;
                link.started = 0;
                if !link.gone {
                    let at = link.to_peer_last.max(now + lat);
                    link.to_peer_last = at;
                    let epoch = link.epoch;
                    self.schedule(
                        at,
                        Event::Down {
                            conn,
                            epoch,
                            msg: Down::Reset,
                        },
                    );
                }
                self.pending.push_back((
                    conn,
                    Input::Closed {
                        conn: ConnKey(conn),
                        ended: Ended::Local,
                    },
                    None,
                ));
            }
            Output::PauseReading { paused, .. } => {
                if paused && !self.holder_over_half(conn) {
                    self.fail(format!(
                        "{} paused while its binary's outbox is within half its budget",
                        PeerId(conn)
                    ));
                }
                let now = self.now;
                let link = self.links.get_mut(&conn).expect("known");
                link.paused = paused;
                if paused {
                    link.read_since = None;
                    link.ping_unanswered = None;
                } else {
                    if link.reading_msg && !link.ending {
                        link.read_since = Some(now);
                    }
                    link.active_since = now;
                    if !link.held.is_empty() {
                        self.schedule(now, Event::Unhold { conn });
                    }
                }
            }
            Output::PushWake { .. } => {}
        }
    }

    pub(super) fn on_send(&mut self, conn: u64, data: Bytes) {
        let link = &self.links[&conn];
        if link.ending {
            self.fail(format!(
                "message to {} after its end was decided",
                PeerId(conn)
            ));
        }
        let frame = match link.side {
            Side::Phone => {
                let i = link.b2p_emitted;
                if link.b2p.get(i) != Some(&data) {
                    self.fail(format!(
                        "relay sent {} {:?}, expected frame {i} {:?}",
                        PeerId(conn),
                        String::from_utf8_lossy(&data),
                        link.b2p.get(i).map(|b| String::from_utf8_lossy(b))
                    ));
                }
                self.links.get_mut(&conn).expect("known").b2p_emitted += 1;
                true
            }
            Side::Binary => {
                let Some((phone, is_frame)) = self.phone_of_binary_message(&data) else {
                    self.fail(format!(
                        "relay sent binary {} a message about no known phone: {:?}",
                        PeerId(conn),
                        String::from_utf8_lossy(&data)
                    ));
                };
                let p = &self.links[&phone];
                if p.notify != Some(conn) {
                    self.fail(format!(
                        "relay sent binary {} a message about {}, which registered with {:?}",
                        PeerId(conn),
                        PeerId(phone),
                        p.notify.map(PeerId)
                    ));
                }
                if is_frame {
                    let i = p.p2b_emitted;
                    if p.notice_emitted || p.p2b.get(i) != Some(&data) {
                        self.fail(format!(
                            "relay sent binary {} {:?}, expected envelope {i} of {} {:?}",
                            PeerId(conn),
                            String::from_utf8_lossy(&data),
                            PeerId(phone),
                            p.p2b.get(i).map(|b| String::from_utf8_lossy(b))
                        ));
                    }
                    self.links.get_mut(&phone).expect("known").p2b_emitted += 1;
                } else {
                    let code: ToBinary<'_> = serde_json::from_slice(&data).expect("parsed above");
                    let code = code.close_code.expect("a notice has a code");
                    let exact = format!(
                        r#"{{"conn_id":"{}","close_code":{code}}}"#,
                        json_escape(&p.conn_id)
                    );
                    if p.notice_emitted || data != exact.as_bytes() {
                        self.fail(format!(
                            "relay sent binary {} a second or malformed notice {:?}",
                            PeerId(conn),
                            String::from_utf8_lossy(&data)
                        ));
                    }
                    self.links.get_mut(&phone).expect("known").notice_emitted = true;
                    self.emitted_notices.push((conn, phone, code));
                }
                is_frame
            }
        };
        let now = self.now;
        let link = self.links.get_mut(&conn).expect("known");
        if link.mirror.is_empty() {
            link.head_since = now;
        }
        let seq = link.next_seq;
        link.next_seq += 1;
        link.mirror.push_back(Charged {
            seq,
            charge: data.len() + ITEM_OVERHEAD,
            frame,
        });
        link.queue.push_back(Down::Text { seq, data });
        self.pump(conn);
    }

    pub(super) fn on_close(&mut self, conn: u64, code: u16, reason: &'static str, discard: bool) {
        let link = &self.links[&conn];
        if link.close_decided || link.aborted {
            self.fail(format!("{} closed twice", PeerId(conn)));
        }
        let was_ending = link.ending;
        if self.opening == Some(conn) && code == 1001 && self.shutdown_at.is_some() {
            self.links.get_mut(&conn).expect("known").registered = false;
            self.rejected_with = Some(code);
        } else if self.opening == Some(conn) && matches!(code, 4404 | 4429) {
            let expected = if code == 4404 {
                "no server with that id"
            } else {
                "too many phones for server-id"
            };
            if reason != expected {
                self.fail(format!("rejected {} with {code} {reason:?}", PeerId(conn)));
            }
            self.links.get_mut(&conn).expect("known").registered = false;
            self.rejected_with = Some(code);
            if code == 4404 {
                self.expect.phone_404 += 1;
            } else {
                self.expect.phone_429 += 1;
            }
        } else {
            self.explain_close(conn, code, reason, discard);
            if !was_ending {
                self.phone_ends(conn, notice_for_reason(reason));
            }
        }
        if !was_ending && self.links[&conn].side == Side::Binary {
            self.binary_ends(conn);
        }
        if code == 4409 {
            self.expect.server_409 += 1;
        }
        let now = self.now;
        let link = self.links.get_mut(&conn).expect("known");
        link.ending = true;
        link.close_decided = true;
        let side = link.side;
        if discard {
            link.queue
                .retain(|d| !matches!(d, Down::Text { .. } | Down::Ping | Down::Pong));
            match side {
                Side::Binary => {
                    let lost = link.mirror_frames();
                    link.mirror.clear();
                    self.drop_frame(DropReason::BinaryGone, lost);
                }
                Side::Phone => {
                    if !link.mirror.is_empty() {
                        self.fail(format!(
                            "{} closed discarding a queue the model expected to keep",
                            PeerId(conn)
                        ));
                    }
                }
            }
        }
        let link = self.links.get_mut(&conn).expect("known");
        if link.mirror.is_empty() {
            link.close_since = Some(now);
        }
        link.queue.push_back(Down::Close { code, reason });
        self.pump(conn);
    }

    /// Checks that the core had a reason to close `conn` now (no spurious closes).
    pub(super) fn explain_close(
        &mut self,
        conn: u64,
        code: u16,
        reason: &'static str,
        discard: bool,
    ) {
        let cfg = &self.cfg.relay;
        let now = self.now;
        let l = &self.links[&conn];
        let who = PeerId(conn);
        if let Some(expected) = l.expected_close {
            if expected != (code, reason, discard) {
                self.fail(format!(
                    "{who} closed {code} {reason:?} (discarding: {discard}), expected {expected:?}"
                ));
            }
            self.links.get_mut(&conn).expect("known").expected_close = None;
            return;
        }
        let st = &self.sids[l.sid_ix];
        match (code, reason) {
            (1000, "") if l.side == Side::Phone => {
                // With `--grace 0` the window begins and ends within this call (§6 rule 4).
                let expired = if cfg.grace.is_zero() {
                    self.shards[l.shard].holder(&st.id).is_none()
                } else {
                    st.holderless_since
                        .is_some_and(|since| now >= since + cfg.grace)
                };
                if !expired {
                    self.fail(format!(
                        "{who} closed 1000 before its id's grace window ended"
                    ));
                }
                // Grace expiry evicts: the phone leaves the registry at once (decision C21).
                self.links.get_mut(&conn).expect("known").registered = false;
            }
            (1008, "read timeout") => {
                if l.read_since.is_none_or(|t| now < t + cfg.read_timeout) {
                    self.fail(format!(
                        "{who} closed for read timeout with no message overdue"
                    ));
                }
            }
            (1012, "rebalance") if self.rebalancing && l.side == Side::Binary => {}
            (1001, "shutting down") if self.shutdown_at.is_some() => {}
            (1011, "heartbeat timeout") => {
                let pong_late = l
                    .ping_unanswered
                    .is_some_and(|t| now >= t + cfg.pong_timeout);
                let probe_failed = st.holder == Some(conn)
                    && st.probe_since.is_some_and(|t| now >= t + cfg.probe_timeout);
                if !pong_late && !probe_failed {
                    self.fail(format!(
                        "{who} closed for heartbeat timeout, but its oldest unanswered ping is \
                         from {:?} (last pong {:?}) and no probe is overdue",
                        l.ping_unanswered, l.last_pong
                    ));
                }
            }
            _ => self.fail(format!(
                "{who} closed {code} {reason:?} for no reason the model knows"
            )),
        }
    }

    /// Checks the closes one call decided that only its outcome explains.
    pub(super) fn explain_call(&mut self) {
        for conn in std::mem::take(&mut self.expecting) {
            if let Some(expected) = self.links[&conn].expected_close {
                self.fail(format!(
                    "{} was not closed {expected:?} as expected",
                    PeerId(conn)
                ));
            }
        }
    }

    /// Compares the model's holder of every id on `shard` with the shard's.
    pub(super) fn verify_holders(&self, shard: usize) {
        for st in self.sids.iter().filter(|st| st.shard == shard) {
            let core = self.shards[shard].holder(&st.id).map(|k| k.0);
            if core != st.holder {
                self.fail(format!(
                    "{} is held by {:?}, the model expects {:?} (claimants {:?})",
                    st.id,
                    core.map(PeerId),
                    st.holder.map(PeerId),
                    st.claimants
                ));
            }
        }
    }

    /// §6: a binary claims (before the shard sees its `Open`).
    pub(super) fn model_claim(&mut self, conn: u64) {
        if self.shutdown_at.is_some() {
            return;
        }
        let ix = self.links[&conn].sid_ix;
        if self.sids[ix].holder.is_some() {
            let st = &mut self.sids[ix];
            if st.claimants.is_empty() {
                st.probe_since = Some(self.now);
            }
            st.claimants.push_back(conn);
        } else {
            // FREE or GRACE: the claimant holds at once; phones left from GRACE are evicted.
            self.expect_evictions(ix);
            self.model_hold(ix, conn);
        }
    }

    pub(super) fn model_hold(&mut self, ix: usize, conn: u64) {
        let st = &mut self.sids[ix];
        st.holder = Some(conn);
        st.holderless_since = None;
        self.expect.server_accepts += 1;
        self.links.get_mut(&conn).expect("known").active_since = self.now;
    }

    pub(super) fn expect_evictions(&mut self, ix: usize) {
        let phones: Vec<u64> = self
            .open
            .iter()
            .copied()
            .filter(|c| {
                let l = &self.links[c];
                l.sid_ix == ix && l.side == Side::Phone && l.registered && !l.ending
            })
            .collect();
        for p in phones {
            self.expect_close(p, 4404, "binary reclaimed server-id", false);
            // Evicted phones leave the registry at once (decision C21).
            self.links.get_mut(&p).expect("known").registered = false;
        }
    }

    /// §6: the holder showed it is alive while claimants wait: they are turned away.
    pub(super) fn model_heard(&mut self, conn: u64) {
        let ix = self.links[&conn].sid_ix;
        if self.sids[ix].holder != Some(conn) {
            return;
        }
        self.sids[ix].probe_since = None;
        for c in std::mem::take(&mut self.sids[ix].claimants) {
            self.expect_close(c, 4409, "server-id already claimed", false);
        }
    }

    /// §6: a binary's end is decided or reported. A holder is gone: the first claimant takes
    /// over (phones evicted, other claimants turned away), or the id enters GRACE.
    pub(super) fn binary_ends(&mut self, conn: u64) {
        let ix = self.links[&conn].sid_ix;
        if self.sids[ix].holder != Some(conn) {
            let st = &mut self.sids[ix];
            st.claimants.retain(|&c| c != conn);
            if st.claimants.is_empty() {
                st.probe_since = None;
            }
            return;
        }
        self.sids[ix].probe_since = None;
        if self.shutdown_at.is_some() {
            let st = &mut self.sids[ix];
            st.holder = None;
            st.holderless_since = None;
            st.claimants.clear();
            return;
        }
        if let Some(first) = self.sids[ix].claimants.pop_front() {
            self.expect_evictions(ix);
            self.model_hold(ix, first);
            for c in std::mem::take(&mut self.sids[ix].claimants) {
                self.expect_close(c, 4409, "server-id already claimed", false);
            }
        } else {
            let st = &mut self.sids[ix];
            st.holder = None;
            st.holderless_since = Some(self.now);
            self.expect.grace_entries += 1;
        }
    }

    /// Whether server-id `ix` is FREE (§6): no holder, and no grace window running.
    pub(super) fn sid_free(&self, ix: usize) -> bool {
        let st = &self.sids[ix];
        st.holder.is_none()
            && st
                .holderless_since
                .is_none_or(|since| self.now >= since + self.cfg.relay.grace)
    }

    /// Phones registered with server-id `ix` whose connection has not ended.
    pub(super) fn registered_phones(&self, ix: usize) -> usize {
        self.open
            .iter()
            .filter(|c| {
                let l = &self.links[c];
                l.sid_ix == ix && l.side == Side::Phone && l.registered
            })
            .count()
    }

    /// Whether `conn`'s server-id has a holder whose outbox is charged over half its budget, the
    /// only condition under which a phone may be paused (§10.2).
    pub(super) fn holder_over_half(&self, conn: u64) -> bool {
        let l = &self.links[&conn];
        self.sids[l.sid_ix].holder.is_some_and(|h| {
            self.links[&h].mirror_charge() > self.cfg.relay.binary_outbox_bytes / 2
        })
    }
}
