//! The page-server protocol's frames (`proto::pages`), read by a forked child from its
//! parent and by the page server in rdma-fork from its clients: a stream of frames decodes
//! frame by frame without panicking; the buffer decoder and the blocking reader agree; every
//! decoded frame passes `Frame::check`, encodes back to the bytes it came from and iterates its
//! pages consistently.

use std::io::Cursor;

use proto::pages::{Frame, FrameError, read_frame, write_frame};

fn round_trip(frame: &Frame, bytes: &[u8]) {
    frame.check().expect("a decoded frame passes check");
    let mut out = Vec::new();
    frame.encode(&mut out);
    assert_eq!(out, bytes, "a decoded frame re-encodes as it came");
    let mut written = Vec::new();
    write_frame(&mut written, frame).expect("writing a checked frame");
    assert_eq!(written, out);
    if let Frame::Pages {
        first_page,
        count,
        zero_map,
        data,
    } = frame
    {
        let pages: Vec<_> = frame
            .page_iter()
            .expect("pages of a checked frame")
            .collect();
        assert_eq!(pages.len(), *count as usize);
        let mut nonzero = 0;
        for (i, (page, contents)) in pages.iter().enumerate() {
            assert_eq!(u64::from(*page), u64::from(*first_page) + i as u64);
            let zero = zero_map[i / 8] & (1 << (i % 8)) != 0;
            assert_eq!(contents.is_none(), zero);
            nonzero += usize::from(!zero);
        }
        assert_eq!(nonzero * proto::pages::PAGE_SIZE as usize, data.len());
    } else {
        assert!(frame.page_iter().is_none());
    }
}

pub fn run(data: &[u8]) {
    // The buffer decoder and the blocking reader must agree on the first frame.
    let decoded = Frame::decode(data);
    let read = read_frame(&mut Cursor::new(data));
    match (&decoded, &read) {
        (Ok((a, _)), Ok(b)) => assert!(a == b, "decode and read_frame differ"),
        (Ok(_), Err(e)) => panic!("decode accepted what read_frame refused: {e}"),
        (Err(FrameError::Incomplete { .. }), Err(_)) => {}
        (Err(e), Ok(_)) => panic!("read_frame accepted what decode refused: {e}"),
        (Err(_), Err(_)) => {}
    }
    let mut rest = data;
    loop {
        match Frame::decode(rest) {
            Ok((frame, used)) => {
                assert!(used > 0 && used <= rest.len());
                round_trip(&frame, &rest[..used]);
                rest = &rest[used..];
            }
            Err(FrameError::Incomplete { needed }) => {
                assert!(needed > 0);
                break;
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                break;
            }
        }
    }
}
