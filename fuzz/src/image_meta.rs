//! What a forked child trusts from its parent before any page moves: the image descriptor
//! (`proto::ImageDescriptor`, binary and text forms, passed to `--resume` and over the
//! peer channel) and the image metadata (`proto::ImageMeta`, from the page server's `Meta`
//! frame). What decodes must validate, and encode to a form that decodes to it again.

use proto::{ImageDescriptor, ImageMeta};

pub fn run(data: &[u8]) {
    if let Ok(d) = ImageDescriptor::decode(data) {
        d.validate().expect("a decoded descriptor is valid");
        let again =
            ImageDescriptor::decode(&d.encode()).expect("re-decoding an encoded descriptor");
        assert!(again == d, "binary form does not round-trip");
        let text = d.to_string();
        let parsed: ImageDescriptor = text.parse().expect("parsing a descriptor's own text");
        assert!(parsed == d, "text form does not round-trip");
        let _ = d.page_count();
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(d) = text.parse::<ImageDescriptor>()
    {
        d.validate().expect("a parsed descriptor is valid");
        let parsed: ImageDescriptor = d
            .to_string()
            .parse()
            .expect("parsing a descriptor's own text");
        assert!(parsed == d, "text form does not round-trip");
    }
    if let Ok(meta) = ImageMeta::decode(data) {
        let again = ImageMeta::decode(&meta.encode()).expect("re-decoding encoded metadata");
        assert_eq!(again, meta);
        assert!(meta.nonzero.count() <= meta.pages());
        let _ = meta.nonzero.iter_set().count();
    }
}
