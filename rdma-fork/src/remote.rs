//! A parent node's image as a [`PageSource`]: what a lazily resumed child's fault handler
//! reads from. Demand faults and prefetch share no connection: each [`RemoteSource`] holds
//! one authenticated [`PageClient`], and a handler that wants prefetch on a separate
//! connection opens a second source.

use std::sync::Mutex;
use std::time::Duration;

use proto::ImageDescriptor;
use proto::pages::MAX_READ_PAGES;

use crate::client::{ClientError, ClientStats, PageClient};
use crate::{FetchError, PAGE_SIZE, PageBitmap, PageSource};

/// Pages of a remote image, fetched over one page-server connection.
pub struct RemoteSource {
    // The handler calls `fetch` through `&self`; one connection carries one request at a time.
    // None until the first fetch for a source made with `connect_on_first_fetch`.
    client: Mutex<Option<PageClient>>,
    nonzero: PageBitmap,
    len: u64,
    /// Where to connect again when the connection is gone (the server closes idle ones): a
    /// lazily filled instance may touch a new page long after it was resumed.
    reconnect: Option<(ImageDescriptor, Duration)>,
}

impl RemoteSource {
    /// Connects to the descriptor's parent and authenticates. `nonzero` is the image's page
    /// map (from its metadata): pages it marks zero are never asked for.
    pub fn connect(
        descriptor: &ImageDescriptor,
        nonzero: PageBitmap,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let client = PageClient::connect(descriptor, timeout)?;
        Ok(Self::from_client(client, nonzero).reconnecting(descriptor.clone(), timeout))
    }

    /// A source that connects (and authenticates) at its first fetch, so a prefetch that
    /// finds every page in the node cache never opens a connection to the parent.
    pub fn connect_on_first_fetch(
        descriptor: &ImageDescriptor,
        nonzero: PageBitmap,
        timeout: Duration,
    ) -> Self {
        RemoteSource {
            client: Mutex::new(None),
            nonzero,
            len: descriptor.page_count() * PAGE_SIZE as u64,
            reconnect: Some((descriptor.clone(), timeout)),
        }
    }

    /// Connects again (once per fetch) when the connection was lost, timed out or closed.
    pub fn reconnecting(mut self, descriptor: ImageDescriptor, timeout: Duration) -> Self {
        self.reconnect = Some((descriptor, timeout));
        self
    }

    /// Wraps a client that is already connected (e.g. the one that fetched the metadata).
    pub fn from_client(client: PageClient, nonzero: PageBitmap) -> Self {
        let len = client.page_count() * PAGE_SIZE as u64;
        RemoteSource {
            client: Mutex::new(Some(client)),
            nonzero,
            len,
            reconnect: None,
        }
    }

    /// What this source's connection has carried so far.
    pub fn stats(&self) -> ClientStats {
        self.client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(PageClient::stats)
            .unwrap_or_default()
    }
}

impl PageSource for RemoteSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn is_zero(&self, page: u64) -> bool {
        self.nonzero.is_clear(page)
    }

    fn fetch(&self, first_page: u64, count: u32, dst: &mut [u8]) -> Result<(), FetchError> {
        crate::check_fetch(self.len / PAGE_SIZE as u64, first_page, count, dst)?;
        let mut guard = self.client.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none()
            && let Some((descriptor, timeout)) = &self.reconnect
        {
            *guard = Some(PageClient::connect(descriptor, *timeout).map_err(fetch_error)?);
        }
        let Some(client) = guard.as_mut() else {
            return Err(FetchError::Unavailable("not connected".into()));
        };
        // A read answers at most MAX_READ_PAGES pages; a larger fetch (eager mode) is split.
        for (i, chunk) in dst
            .chunks_mut(MAX_READ_PAGES as usize * PAGE_SIZE)
            .enumerate()
        {
            let first = first_page + i as u64 * u64::from(MAX_READ_PAGES);
            let n = (chunk.len() / PAGE_SIZE) as u32;
            // `first` is below the page count, which fits the protocol's u32 (4 GiB memory).
            let mut result = client.read(first as u32, n, chunk);
            if let (Err(e), Some((descriptor, timeout))) = (&result, &self.reconnect)
                && matches!(
                    e,
                    ClientError::ConnectionLost { .. }
                        | ClientError::Timeout { .. }
                        | ClientError::Unusable
                )
            {
                tracing::info!("page connection gone ({e}); connecting to the parent again");
                match PageClient::connect(descriptor, *timeout) {
                    Ok(fresh) => {
                        *client = fresh;
                        result = client.read(first as u32, n, chunk);
                    }
                    Err(again) => result = Err(again),
                }
            }
            result.map_err(fetch_error)?;
        }
        Ok(())
    }
}

fn fetch_error(e: ClientError) -> FetchError {
    match e {
        ClientError::Refused {
            reason, message, ..
        } => FetchError::Refused { reason, message },
        other => FetchError::Unavailable(other.to_string()),
    }
}
