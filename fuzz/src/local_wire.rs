//! The node-local protocols a worker or zygote reads from the gateway, and the gateway from
//! them: the zygote's spawn requests and replies (`proto::zygote`, parsed by chain-runtime's
//! zygote in `check_request` and by the gateway) and the worker control frames
//! (`proto::control`). A decoded message must encode back to bytes that decode to it again,
//! and a spawn request, a fixed-size message, to exactly the bytes it came from.

use proto::control::{ControlMessage, HEADER_LEN, Header};
use proto::zygote::{MAX_PACKET, Reply, SpawnRequest};

pub fn run(data: &[u8]) {
    if let Ok(request) = SpawnRequest::from_bytes(data) {
        assert_eq!(&request.to_bytes()[..], data, "{request:?}");
    }
    if let Ok(reply) = Reply::from_bytes(data) {
        let bytes = reply.to_bytes();
        assert!(bytes.len() <= MAX_PACKET);
        assert_eq!(Reply::from_bytes(&bytes).as_ref(), Ok(&reply));
    }
    if let Some((header, payload)) = data.split_first_chunk::<HEADER_LEN>()
        && let Ok(h) = Header::decode(header)
    {
        let payload = &payload[..payload.len().min(h.payload_len)];
        if let Ok(message) = ControlMessage::decode(h, payload) {
            let frame = message.encode();
            let again = Header::decode(frame[..HEADER_LEN].try_into().unwrap())
                .and_then(|h2| ControlMessage::decode(h2, &frame[HEADER_LEN..]));
            assert_eq!(again.as_ref(), Ok(&message));
            assert_eq!(
                h.carries_fd(),
                matches!(message, ControlMessage::Prepared { .. })
            );
            assert_eq!(
                &frame[..],
                &data[..frame.len()],
                "a decoded frame re-encodes as it came"
            );
        }
    }
}
