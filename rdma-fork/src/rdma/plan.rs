//! Which one-sided RDMA READs serve a page request: the arithmetic between a request
//! (`first_page`, `count`), the image's non-zero page map and the parent's registered region.
//!
//! Zero pages are never read (the child zero-fills them locally, as the TCP path does),
//! contiguous non-zero pages become one READ up to `max_read` bytes, and nothing outside the
//! region or the image is ever addressed: all arithmetic is checked, because the region came
//! from the peer.

use proto::PageBitmap;

use super::RegionInfo;
use crate::PAGE_SIZE;

/// The default largest single READ: large enough to reach line rate, small enough that one
/// request does not hold the queue for long.
pub const MAX_READ_BYTES: u32 = 1 << 20;

const PAGE: u64 = PAGE_SIZE as u64;

/// One READ work request: `length` bytes from the parent's `remote_addr` (under `rkey`) to
/// `local_offset` in the destination of the page request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRequest {
    pub remote_addr: u64,
    pub rkey: u32,
    pub local_offset: u64,
    pub length: u32,
}

/// Why a page request cannot be planned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    #[error("the largest READ ({0} bytes) is smaller than a page")]
    BadMaxRead(u32),
    #[error("pages {first_page}..+{count} overflow the address arithmetic")]
    Overflow { first_page: u64, count: u32 },
    #[error("pages {first_page}..+{count} reach past the {len}-byte registered region")]
    OutsideRegion {
        first_page: u64,
        count: u32,
        len: u64,
    },
    #[error("pages {first_page}..+{count} reach past the image of {pages} pages")]
    OutsideImage {
        first_page: u64,
        count: u32,
        pages: u64,
    },
    #[error("the region at {remote_addr:#x} + {len} bytes wraps the address space")]
    RegionWraps { remote_addr: u64, len: u64 },
}

/// The READs for pages `first_page .. first_page + count` of an image whose non-zero pages
/// are `nonzero`, registered as `region`; each READ at most `max_read` bytes (rounded down to
/// whole pages). Ascending, non-overlapping; pages absent from the plan are zero.
pub fn plan_reads(
    region: &RegionInfo,
    nonzero: &PageBitmap,
    first_page: u64,
    count: u32,
    max_read: u32,
) -> Result<Vec<ReadRequest>, PlanError> {
    let per_read = u64::from(max_read) / PAGE;
    if per_read == 0 {
        return Err(PlanError::BadMaxRead(max_read));
    }
    let overflow = PlanError::Overflow { first_page, count };
    let region_end = region
        .remote_addr
        .checked_add(region.len)
        .ok_or(PlanError::RegionWraps {
            remote_addr: region.remote_addr,
            len: region.len,
        })?;
    let end_page = first_page
        .checked_add(u64::from(count))
        .ok_or(overflow.clone())?;
    let end_byte = end_page.checked_mul(PAGE).ok_or(overflow.clone())?;
    if end_byte > region.len {
        return Err(PlanError::OutsideRegion {
            first_page,
            count,
            len: region.len,
        });
    }
    if end_page > nonzero.pages() {
        return Err(PlanError::OutsideImage {
            first_page,
            count,
            pages: nonzero.pages(),
        });
    }

    let mut reads = Vec::new();
    // The open run: (first page, pages).
    let mut run: Option<(u64, u64)> = None;
    let flush = |reads: &mut Vec<ReadRequest>, (start, pages): (u64, u64)| {
        // start + pages <= end_page, whose byte offset fits the region checked above, and
        // the region does not wrap: none of these can overflow.
        let remote_addr = region.remote_addr + start * PAGE;
        debug_assert!(remote_addr + pages * PAGE <= region_end);
        reads.push(ReadRequest {
            remote_addr,
            rkey: region.rkey,
            local_offset: (start - first_page) * PAGE,
            // pages <= per_read, so the length is at most max_read.
            length: (pages * PAGE) as u32,
        });
    };
    for page in first_page..end_page {
        if !nonzero.is_set(page) {
            if let Some(r) = run.take() {
                flush(&mut reads, r);
            }
            continue;
        }
        run = match run {
            Some((start, pages)) if pages < per_read => Some((start, pages + 1)),
            Some(full) => {
                flush(&mut reads, full);
                Some((page, 1))
            }
            None => Some((page, 1)),
        };
    }
    if let Some(r) = run {
        flush(&mut reads, r);
    }
    Ok(reads)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(pages: u64) -> RegionInfo {
        RegionInfo {
            remote_addr: 0x7f00_0000_0000,
            rkey: 0xabcd,
            len: pages * PAGE,
        }
    }

    fn map(pages: u64, bits: u64) -> PageBitmap {
        let mut m = PageBitmap::new(pages);
        for p in 0..pages {
            if p < 64 && bits >> p & 1 == 1 {
                m.set(p);
            }
        }
        m
    }

    /// Every bitmap of up to 8 pages, every request inside it, READ limits of 1..=4 pages:
    /// the plan covers exactly the non-zero requested pages, once, in order, each READ within
    /// the limit and every run as long as the limit allows.
    #[test]
    fn exhaustive_small_images() {
        for pages in 0..=8u64 {
            let r = region(pages);
            for bits in 0..(1u64 << pages) {
                let m = map(pages, bits);
                for first in 0..=pages {
                    for count in 0..=(pages - first) as u32 {
                        for per in 1..=4u64 {
                            let max = (per * PAGE) as u32 + 17; // rounded down to pages
                            let plan = plan_reads(&r, &m, first, count, max).unwrap();
                            let mut covered = vec![false; pages as usize];
                            let mut last_end: Option<u64> = None;
                            let mut last_len = 0;
                            for rd in &plan {
                                assert_eq!(rd.rkey, r.rkey);
                                assert!(rd.length > 0 && u64::from(rd.length) <= per * PAGE);
                                assert_eq!(rd.length as u64 % PAGE, 0);
                                assert_eq!(rd.local_offset % PAGE, 0);
                                let start = first + rd.local_offset / PAGE;
                                assert_eq!(rd.remote_addr, r.remote_addr + start * PAGE);
                                let n = u64::from(rd.length) / PAGE;
                                if let Some(end) = last_end {
                                    assert!(start >= end, "ascending, no overlap");
                                    if start == end {
                                        assert_eq!(last_len, per, "a run split before the limit");
                                    }
                                }
                                for p in start..start + n {
                                    assert!(!covered[p as usize]);
                                    covered[p as usize] = true;
                                }
                                last_end = Some(start + n);
                                last_len = n;
                            }
                            for p in 0..pages {
                                let want =
                                    p >= first && p < first + u64::from(count) && m.is_set(p);
                                assert_eq!(covered[p as usize], want, "page {p} bits {bits:b}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn coalesces_up_to_the_limit() {
        let m = map(8, 0xff);
        let plan = plan_reads(&region(8), &m, 0, 8, 3 * PAGE as u32).unwrap();
        let lens: Vec<u32> = plan.iter().map(|r| r.length / PAGE as u32).collect();
        assert_eq!(lens, [3, 3, 2]);
        assert_eq!(plan[1].local_offset, 3 * PAGE);
        // A request in the middle: offsets are relative to the request.
        let plan = plan_reads(&region(8), &map(8, 0b0110_0100), 2, 5, MAX_READ_BYTES).unwrap();
        assert_eq!(plan.len(), 2);
        assert_eq!((plan[0].local_offset, plan[0].length), (0, PAGE as u32));
        assert_eq!(
            (plan[1].local_offset, plan[1].length),
            (3 * PAGE, 2 * PAGE as u32)
        );
    }

    #[test]
    fn refusals_and_overflow_edges() {
        let m = map(4, 0b1111);
        let r = region(4);
        assert_eq!(
            plan_reads(&r, &m, 0, 1, 4095),
            Err(PlanError::BadMaxRead(4095))
        );
        assert_eq!(plan_reads(&r, &m, 0, 1, 0), Err(PlanError::BadMaxRead(0)));
        assert!(matches!(
            plan_reads(&r, &m, 0, 5, MAX_READ_BYTES),
            Err(PlanError::OutsideRegion { .. })
        ));
        assert!(matches!(
            plan_reads(&r, &m, 4, 1, MAX_READ_BYTES),
            Err(PlanError::OutsideRegion { .. })
        ));
        // An empty request at the end is fine and reads nothing.
        assert_eq!(plan_reads(&r, &m, 4, 0, MAX_READ_BYTES), Ok(vec![]));
        // first_page + count overflows u64; the page's byte offset overflows u64.
        assert!(matches!(
            plan_reads(&r, &m, u64::MAX, 1, MAX_READ_BYTES),
            Err(PlanError::Overflow { .. })
        ));
        assert!(matches!(
            plan_reads(&r, &m, u64::MAX / 2, 1, MAX_READ_BYTES),
            Err(PlanError::Overflow { .. })
        ));
        // End page fits u64 but its byte offset does not; the last page whose end fits is
        // simply outside the region.
        assert!(matches!(
            plan_reads(&r, &m, u64::MAX - 3, 3, MAX_READ_BYTES),
            Err(PlanError::Overflow { .. })
        ));
        assert!(matches!(
            plan_reads(&r, &m, u64::MAX / PAGE - 1, 1, MAX_READ_BYTES),
            Err(PlanError::OutsideRegion { .. })
        ));
        // A region that wraps the address space.
        let wrap = RegionInfo {
            remote_addr: u64::MAX - PAGE + 1,
            rkey: 1,
            len: 2 * PAGE,
        };
        assert!(matches!(
            plan_reads(&wrap, &m, 0, 1, MAX_READ_BYTES),
            Err(PlanError::RegionWraps { .. })
        ));
        // The region's end must be representable: ending at u64::MAX is the highest valid.
        let top = RegionInfo {
            remote_addr: u64::MAX - 4 * PAGE,
            rkey: 1,
            len: 4 * PAGE,
        };
        let plan = plan_reads(&top, &m, 0, 4, MAX_READ_BYTES).unwrap();
        assert_eq!(
            plan,
            vec![ReadRequest {
                remote_addr: top.remote_addr,
                rkey: 1,
                local_offset: 0,
                length: 4 * PAGE as u32
            }]
        );
        // A region larger than the image: pages past the image are refused.
        assert!(matches!(
            plan_reads(&region(8), &m, 3, 2, MAX_READ_BYTES),
            Err(PlanError::OutsideImage { .. })
        ));
        // The largest READ that fits u32, and a count of u32::MAX pages.
        let big = map(1 << 20, 0);
        let plan = plan_reads(&region(1 << 20), &big, 0, 1 << 20, u32::MAX).unwrap();
        assert!(plan.is_empty());
        assert!(matches!(
            plan_reads(&region(1 << 20), &big, 0, u32::MAX, u32::MAX),
            Err(PlanError::OutsideRegion { .. })
        ));
    }

    #[test]
    fn max_read_of_u32_max_gives_whole_page_reads() {
        // 1100 pages (4.4 MiB) under a u32::MAX limit: one READ of whole pages.
        let n = 1100u64;
        let mut m = PageBitmap::new(n);
        for p in 0..n {
            m.set(p);
        }
        let plan = plan_reads(&region(n), &m, 0, n as u32, u32::MAX).unwrap();
        assert_eq!(plan.len(), 1);
        assert_eq!(u64::from(plan[0].length), n * PAGE);
    }
}
