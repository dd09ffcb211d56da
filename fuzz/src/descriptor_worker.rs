//! The worker's whole check of an incoming descriptor (`chain_runtime::worker::check_descriptor`:
//! addressed to this function of this chain, status Ok, then the arena's check), against the
//! model in `descriptor.rs`.

use crate::descriptor::{Addressing, run_with};

const FN_ID: u32 = 3;
const CHAIN: u16 = 2;

pub fn run(data: &[u8]) {
    run_with(
        data,
        Some(Addressing {
            fn_id: FN_ID,
            chain: CHAIN,
        }),
        |arena, d| {
            chain_runtime::worker::check_descriptor(arena, FN_ID, CHAIN, d).map_err(|r| r.reason)
        },
    );
}
