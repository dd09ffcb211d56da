//! Shared by the integration tests: a 64-page image with a known pattern and known zero
//! pages, and a source that fails on chosen pages.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::sync::Arc;

use rdma_fork::{FetchError, MemfdSource, PAGE_SIZE, PageSource};

pub const PAGES: usize = 64;

/// Zero pages: every fifth page from 2 on, and the last four (a heap tail).
pub fn is_zero_page(page: usize) -> bool {
    page % 5 == 2 || page >= PAGES - 4
}

/// The image: data pages hold a pattern with no zero byte.
pub fn image() -> Vec<u8> {
    let mut image = vec![0u8; PAGES * PAGE_SIZE];
    for (page, chunk) in image.chunks_mut(PAGE_SIZE).enumerate() {
        if !is_zero_page(page) {
            for (i, b) in chunk.iter_mut().enumerate() {
                *b = ((page * 131 + i * 7) % 251) as u8 + 1;
            }
        }
    }
    image
}

pub fn source() -> Arc<MemfdSource> {
    Arc::new(MemfdSource::from_image("lazy-test-image", &image()).unwrap())
}

pub fn nonzero_pages() -> usize {
    (0..PAGES).filter(|&p| !is_zero_page(p)).count()
}

/// FNV-1a of a page, for reports across processes.
pub fn hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A source whose fetches fail when they include one of `failing`.
pub struct Failing {
    pub inner: Arc<MemfdSource>,
    pub failing: BTreeSet<u64>,
}

impl PageSource for Failing {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn is_zero(&self, page: u64) -> bool {
        self.inner.is_zero(page)
    }
    fn fetch(&self, first_page: u64, count: u32, dst: &mut [u8]) -> Result<(), FetchError> {
        let end = first_page + u64::from(count);
        if self.failing.range(first_page..end).next().is_some() {
            return Err(FetchError::Unavailable(format!(
                "page server lost (pages {first_page}..{end})"
            )));
        }
        self.inner.fetch(first_page, count, dst)
    }
}
