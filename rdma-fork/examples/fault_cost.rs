//! Informal cost of lazy pages on this machine: touch every page of a region served from a
//! MemfdSource, in-process, with readahead off and on, eager, and a plain anonymous region
//! as the floor. Needs root (userfaultfd with kernel-mode faults).
//!
//! cargo run --release -p rdma-fork --example fault_cost [MiB] [rounds]

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma_fork::{AnonRegion, LazyRegion, MemfdSource, PAGE_SIZE, ServeOptions};

fn touch_all(mem: &AnonRegion, order: &[usize]) {
    for &p in order {
        // SAFETY: inside the mapping; the read faults the page in.
        unsafe { mem.as_ptr().add(p * PAGE_SIZE).read_volatile() };
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map_or(16, |a| a.parse().expect("MiB"));
    let rounds: usize = args.next().map_or(5, |a| a.parse().expect("rounds"));
    let pages = mib * 256;
    let image: Vec<u8> = (0..pages * PAGE_SIZE)
        .map(|i| (i % 251) as u8 + 1)
        .collect();
    let source = Arc::new(MemfdSource::from_image("fault-cost", &image).unwrap());
    let sequential: Vec<usize> = (0..pages).collect();
    // A fixed pseudo-random permutation (xorshift), so readahead cannot help much.
    let mut shuffled = sequential.clone();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..pages).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        shuffled.swap(i, (x % (i as u64 + 1)) as usize);
    }

    println!("{mib} MiB ({pages} pages), best of {rounds} rounds, in-process handler");
    println!(
        "{:<28} {:>10} {:>9} {:>12} {:>12}",
        "mode", "total ms", "faults", "us/fault", "us/page"
    );
    let floor = best(rounds, || {
        let mem = AnonRegion::new(pages * PAGE_SIZE).unwrap();
        let t = Instant::now();
        touch_all(&mem, &sequential);
        (t.elapsed(), pages as u64)
    });
    row("plain anonymous (no uffd)", floor, pages);
    for (name, order) in [("sequential", &sequential), ("random", &shuffled)] {
        for ra in [0u32, 7, 15, 63] {
            let r = best(rounds, || {
                let mem = AnonRegion::new(pages * PAGE_SIZE).unwrap();
                let options = ServeOptions {
                    readahead: ra,
                    ..ServeOptions::default()
                };
                // SAFETY: a fresh mapping used only here, outliving the region.
                let region =
                    unsafe { LazyRegion::new(mem.base(), mem.len(), source.clone(), options) }
                        .unwrap();
                let t = Instant::now();
                touch_all(&mem, order);
                let took = t.elapsed();
                let faults = region.finish().unwrap().stats.faults;
                (took, faults)
            });
            row(&format!("{name}, readahead {ra}"), r, pages);
        }
    }
    let eager = best(rounds, || {
        let mem = AnonRegion::new(pages * PAGE_SIZE).unwrap();
        let options = ServeOptions {
            eager: true,
            ..ServeOptions::default()
        };
        let t = Instant::now();
        // SAFETY: as above.
        let region =
            unsafe { LazyRegion::new(mem.base(), mem.len(), source.clone(), options) }.unwrap();
        touch_all(&mem, &sequential);
        let took = t.elapsed();
        (took, region.finish().unwrap().stats.faults)
    });
    row("eager (populate + touch)", eager, pages);
}

fn best(rounds: usize, mut f: impl FnMut() -> (Duration, u64)) -> (Duration, u64) {
    (0..rounds).map(|_| f()).min_by_key(|r| r.0).unwrap()
}

fn row(name: &str, (took, faults): (Duration, u64), pages: usize) {
    let us = took.as_secs_f64() * 1e6;
    let per_fault = if faults == 0 { 0.0 } else { us / faults as f64 };
    println!(
        "{name:<28} {:>10.2} {faults:>9} {per_fault:>12.2} {:>12.3}",
        us / 1e3,
        us / pages as f64
    );
}
