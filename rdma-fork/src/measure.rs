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
}
