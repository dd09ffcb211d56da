//! Page sources on this node: a sealed memfd holding a parent's memory image, plus the bitmap
//! of its non-zero pages.
//!
//! The image is read with `pread`, never mapped: a read past a (however) shortened file is a
//! short read and so a [`FetchError`], where a mapping would raise SIGBUS in the handler. The
//! seals make the image immutable anyway, so every child forked from it sees the same bytes.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};

use crate::lifecycle::{Live, Resource};
use crate::{FetchError, PAGE_SIZE, PageSource};

pub use proto::PageBitmap;

/// Why a [`MemfdSource`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the memfd is {len} bytes, not a whole number of {PAGE_SIZE}-byte pages")]
    NotPageMultiple { len: u64 },
    #[error("the memfd must be sealed against shrinking and writing (seals {seals:#x})")]
    NotSealed { seals: i32 },
    #[error("the non-zero bitmap covers {bitmap} pages, the image has {image}")]
    BitmapSize { bitmap: u64, image: u64 },
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> SourceError {
    move |source| SourceError::Io { op, source }
}

const REQUIRED_SEALS: SealFlag = SealFlag::F_SEAL_SHRINK.union(SealFlag::F_SEAL_WRITE);

/// A memory image in a sealed memfd on this node, read with `pread`.
#[derive(Debug)]
pub struct MemfdSource {
    file: File,
    len: u64,
    nonzero: PageBitmap,
    _live: Live,
}

impl MemfdSource {
    /// Copies `image` into a new memfd called `name`, pads it to a whole page and seals it
    /// (no shrink, grow, write or further seals).
    pub fn from_image(name: &str, image: &[u8]) -> Result<Self, SourceError> {
        let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
            .map_err(|e| io_err("memfd_create")(e.into()))?;
        let mut file = File::from(fd);
        file.write_all(image).map_err(io_err("writing the image"))?;
        let len = image.len().div_ceil(PAGE_SIZE) as u64 * PAGE_SIZE as u64;
        file.set_len(len).map_err(io_err("sizing the memfd"))?;
        let seals = SealFlag::F_SEAL_SHRINK
            | SealFlag::F_SEAL_GROW
            | SealFlag::F_SEAL_WRITE
            | SealFlag::F_SEAL_SEAL;
        fcntl(&file, FcntlArg::F_ADD_SEALS(seals)).map_err(|e| io_err("sealing")(e.into()))?;
        Ok(MemfdSource {
            file,
            len,
            nonzero: PageBitmap::nonzero_pages(image),
            _live: Live::new(Resource::Memfd),
        })
    }

    /// Wraps an existing memfd image (a snapshot somebody else wrote). It must be sealed at
    /// least against shrinking and writing. Without `nonzero` the image is scanned for it.
    pub fn from_memfd(fd: OwnedFd, nonzero: Option<PageBitmap>) -> Result<Self, SourceError> {
        let seals =
            fcntl(&fd, FcntlArg::F_GET_SEALS).map_err(|e| io_err("F_GET_SEALS")(e.into()))?;
        if !SealFlag::from_bits_retain(seals).contains(REQUIRED_SEALS) {
            return Err(SourceError::NotSealed { seals });
        }
        let file = File::from(fd);
        let len = file.metadata().map_err(io_err("fstat"))?.len();
        if !len.is_multiple_of(PAGE_SIZE as u64) {
            return Err(SourceError::NotPageMultiple { len });
        }
        let pages = len / PAGE_SIZE as u64;
        let nonzero = match nonzero {
            Some(map) if map.pages() != pages => {
                return Err(SourceError::BitmapSize {
                    bitmap: map.pages(),
                    image: pages,
                });
            }
            Some(map) => map,
            None => scan(&file, pages).map_err(io_err("scanning the image"))?,
        };
        Ok(MemfdSource {
            file,
            len,
            nonzero,
            _live: Live::new(Resource::Memfd),
        })
    }

    /// The pages of the image that hold data.
    pub fn nonzero(&self) -> &PageBitmap {
        &self.nonzero
    }
}

fn scan(file: &File, pages: u64) -> io::Result<PageBitmap> {
    let mut map = PageBitmap::new(pages);
    let mut buf = vec![0u8; PAGE_SIZE];
    for page in 0..pages {
        file.read_exact_at(&mut buf, page * PAGE_SIZE as u64)?;
        if buf.iter().any(|&b| b != 0) {
            map.set(page);
        }
    }
    Ok(map)
}

impl AsFd for MemfdSource {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl PageSource for MemfdSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn is_zero(&self, page: u64) -> bool {
        self.nonzero.is_clear(page)
    }

    fn fetch(&self, first_page: u64, count: u32, dst: &mut [u8]) -> Result<(), FetchError> {
        crate::check_fetch(self.nonzero.pages(), first_page, count, dst)?;
        let start = first_page * PAGE_SIZE as u64;
        let mut done = 0;
        while done < dst.len() {
            match self.file.read_at(&mut dst[done..], start + done as u64) {
                Ok(0) => {
                    return Err(FetchError::ShortRead {
                        offset: start + done as u64,
                    });
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Vec<u8> {
        let mut image = vec![0u8; 5 * PAGE_SIZE + 100];
        image[PAGE_SIZE + 7] = 1;
        image[3 * PAGE_SIZE] = 2;
        image[5 * PAGE_SIZE + 99] = 3;
        image
    }

    #[test]
    fn bitmap_marks_nonzero_pages_and_round_trips() {
        let map = PageBitmap::nonzero_pages(&image());
        assert_eq!(map.pages(), 6);
        let set: Vec<u64> = (0..8).filter(|&p| map.is_set(p)).collect();
        assert_eq!(set, [1, 3, 5]);
        assert_eq!(map.count(), 3);
        let back = PageBitmap::from_words(6, map.words().to_vec()).unwrap();
        assert_eq!(back, map);
        assert!(PageBitmap::from_words(6, vec![1 << 6]).is_none());
        assert!(PageBitmap::from_words(65, vec![0]).is_none());
    }

    #[test]
    fn memfd_source_reads_pages_and_knows_zero_pages() {
        let img = image();
        let src = MemfdSource::from_image("test-image", &img).unwrap();
        assert_eq!(src.len(), 6 * PAGE_SIZE as u64);
        assert!(src.is_zero(0) && !src.is_zero(1) && src.is_zero(2) && !src.is_zero(3));
        assert!(!src.is_zero(6), "out of range is not known zero");
        let mut buf = vec![0xAAu8; 3 * PAGE_SIZE];
        src.fetch(1, 3, &mut buf).unwrap();
        assert_eq!(buf, img[PAGE_SIZE..4 * PAGE_SIZE]);
        let mut last = vec![0xAAu8; PAGE_SIZE];
        src.fetch(5, 1, &mut last).unwrap();
        assert_eq!(last[..100], img[5 * PAGE_SIZE..]);
        assert!(last[100..].iter().all(|&b| b == 0), "padding is zero");
    }

    #[test]
    fn memfd_source_rejects_bad_requests() {
        let src = MemfdSource::from_image("test-image", &image()).unwrap();
        let mut buf = vec![0u8; PAGE_SIZE];
        assert!(matches!(
            src.fetch(6, 1, &mut buf),
            Err(FetchError::OutOfRange { .. })
        ));
        assert!(matches!(
            src.fetch(u64::MAX, 1, &mut buf),
            Err(FetchError::OutOfRange { .. })
        ));
        assert!(matches!(
            src.fetch(0, 2, &mut buf),
            Err(FetchError::BadBuffer { .. })
        ));
    }

    #[test]
    fn from_memfd_requires_seals_and_scans() {
        let src = MemfdSource::from_image("test-image", &image()).unwrap();
        let dup = src.as_fd().try_clone_to_owned().unwrap();
        let again = MemfdSource::from_memfd(dup, None).unwrap();
        assert_eq!(again.nonzero(), src.nonzero());
        let dup = src.as_fd().try_clone_to_owned().unwrap();
        assert!(matches!(
            MemfdSource::from_memfd(dup, Some(PageBitmap::new(3))),
            Err(SourceError::BitmapSize { .. })
        ));

        let open = memfd_create("unsealed", MFdFlags::MFD_CLOEXEC).unwrap();
        assert!(matches!(
            MemfdSource::from_memfd(open, None),
            Err(SourceError::NotSealed { .. })
        ));
    }
}
