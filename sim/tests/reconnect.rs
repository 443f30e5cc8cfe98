//! Runs `examples/reconnect.rs`: a binary reconnects within grace, reclaims, its phone re-dials.

#[path = "../examples/reconnect.rs"]
mod reconnect;

#[test]
fn binary_reconnect_reclaim_and_phone_redial() {
    reconnect::main();
}
