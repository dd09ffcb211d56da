//! Measurements for tests and benchmarks: how much of a region is actually populated.

use std::io;

use crate::PAGE_SIZE;

/// Pages of `[base, base + len)` with a page-table entry (`mincore`): pages installed by a
/// fault handler, including zero pages, which smaps' Rss would not count. Reading the page
/// tables does not fault anything in. `base` must be page aligned; a partial last page
/// counts as a page; an unmapped range is an error (`ENOMEM`).
pub fn resident_pages(base: *const u8, len: usize) -> io::Result<usize> {
    if !(base as usize).is_multiple_of(PAGE_SIZE) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut vec = vec![0u8; len.div_ceil(PAGE_SIZE)];
    if vec.is_empty() {
        return Ok(0);
    }
    // SAFETY: mincore reads page tables only (never the memory at `base`) and writes one
    // byte per page of the range into `vec`, which is exactly that long. nix has no wrapper.
    let r = unsafe { libc::mincore(base as *mut libc::c_void, len, vec.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(vec.iter().filter(|&&b| b & 1 != 0).count())
}

/// Kibibytes of `Rss` that `/proc/self/smaps` reports for the mappings overlapping
/// `[base, base + len)`: what the kernel charges this process for the range. Unlike
/// [`resident_pages`] it leaves out pages mapped to the shared zero page (`UFFDIO_ZEROPAGE`),
/// so for a lazily resumed memory it counts the data pages installed. A mapping that extends
/// beyond the range counts whole (a linear memory's reservation around it is never touched).
pub fn smaps_rss_kib(base: *const u8, len: usize) -> io::Result<u64> {
    let (start, end) = (base as usize, base as usize + len);
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut overlapping = false;
    let mut rss = 0;
    for line in smaps.lines() {
        // A mapping's header: "lo-hi perms offset dev inode [path]".
        if let Some((range, _)) = line.split_once(' ')
            && let Some((lo, hi)) = range.split_once('-')
            && let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        {
            overlapping = lo < end && start < hi;
        } else if overlapping && let Some(kib) = line.strip_prefix("Rss:") {
            let kib = kib.trim().trim_end_matches("kB").trim();
            rss += kib.parse::<u64>().map_err(io::Error::other)?;
        }
    }
    Ok(rss)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AnonRegion;

    #[test]
    fn counts_touched_pages_only() {
        let region = AnonRegion::new(16 * PAGE_SIZE).unwrap();
        assert_eq!(resident_pages(region.as_ptr(), region.len()).unwrap(), 0);
        for page in [0, 3, 15] {
            // SAFETY: inside the mapping, which nothing else uses.
            unsafe { region.as_ptr().add(page * PAGE_SIZE).write_volatile(1) };
        }
        assert_eq!(resident_pages(region.as_ptr(), region.len()).unwrap(), 3);
        // SAFETY: the region's content is disposable.
        unsafe { crate::discard(region.base(), region.len()).unwrap() };
        assert_eq!(resident_pages(region.as_ptr(), region.len()).unwrap(), 0);
        assert!(resident_pages(region.as_ptr().wrapping_add(1), 1).is_err());
    }

    #[test]
    fn smaps_rss_counts_written_pages_of_the_range() {
        let region = AnonRegion::new(64 * PAGE_SIZE).unwrap();
        assert_eq!(smaps_rss_kib(region.as_ptr(), region.len()).unwrap(), 0);
        for page in 0..10 {
            // SAFETY: inside the mapping, which nothing else uses.
            unsafe { region.as_ptr().add(page * PAGE_SIZE).write_volatile(1) };
        }
        let kib = smaps_rss_kib(region.as_ptr(), region.len()).unwrap();
        assert_eq!(kib, 10 * PAGE_SIZE as u64 / 1024);
    }
}
