//! Content types: the media formats the store accepts, each with its MIME
//! type and canonical extension. What a file *is* is found by the probe
//! ([`crate::media`]); this module only names the result.

/// Whether a content type is audio or an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaClass {
    /// A sound recording.
    Audio,
    /// A picture, such as cover art.
    Image,
}

/// A recognised media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentType {
    /// The MIME type, e.g. `audio/flac`.
    pub mime: &'static str,
    /// The canonical file extension without the dot, e.g. `flac`, `jpg`: `{ext}` in object names.
    pub extension: &'static str,
    /// Audio or image.
    pub class: MediaClass,
}

const WAV: ContentType = media("audio/wav", "wav", MediaClass::Audio);
const FLAC: ContentType = media("audio/flac", "flac", MediaClass::Audio);
const MPEG: ContentType = media("audio/mpeg", "mp3", MediaClass::Audio);
const OGG: ContentType = media("audio/ogg", "ogg", MediaClass::Audio);
const OPUS: ContentType = media("audio/opus", "opus", MediaClass::Audio);
const AAC: ContentType = media("audio/aac", "aac", MediaClass::Audio);
const MP4: ContentType = media("audio/mp4", "m4a", MediaClass::Audio);
const AIFF: ContentType = media("audio/aiff", "aiff", MediaClass::Audio);
const JPEG: ContentType = media("image/jpeg", "jpg", MediaClass::Image);
const PNG: ContentType = media("image/png", "png", MediaClass::Image);
const WEBP: ContentType = media("image/webp", "webp", MediaClass::Image);

/// Every content type the store accepts, one per canonical extension.
pub const ALL: [ContentType; 11] = [WAV, FLAC, MPEG, OGG, OPUS, MP4, AAC, AIFF, JPEG, PNG, WEBP];

/// The accepted content types of one class (the names an object of that kind can have).
pub fn of_class(class: MediaClass) -> impl Iterator<Item = ContentType> {
    ALL.into_iter()
        .filter(move |content_type| content_type.class == class)
}

/// A content type from its parts, for the constants above.
const fn media(mime: &'static str, extension: &'static str, class: MediaClass) -> ContentType {
    ContentType {
        mime,
        extension,
        class,
    }
}

/// The content type a canonical extension (without the dot) names, if any.
pub fn from_extension(extension: &str) -> Option<ContentType> {
    ALL.into_iter()
        .find(|content_type| content_type.extension == extension)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_type_has_its_documented_mime_extension_and_class() {
        let described: Vec<String> = ALL
            .iter()
            .map(|found| format!("{} {} {:?}", found.mime, found.extension, found.class))
            .collect();
        assert_eq!(
            described,
            [
                "audio/wav wav Audio",
                "audio/flac flac Audio",
                "audio/mpeg mp3 Audio",
                "audio/ogg ogg Audio",
                "audio/opus opus Audio",
                "audio/mp4 m4a Audio",
                "audio/aac aac Audio",
                "audio/aiff aiff Audio",
                "image/jpeg jpg Image",
                "image/png png Image",
                "image/webp webp Image",
            ]
        );
    }

    #[test]
    fn only_canonical_extensions_name_a_type() {
        assert_eq!(from_extension("flac"), Some(FLAC));
        assert_eq!(from_extension("jpg"), Some(JPEG));
        assert_eq!(from_extension("jpeg"), None);
        assert_eq!(from_extension(".mp3"), None);
        assert_eq!(of_class(MediaClass::Image).count(), 3);
        assert_eq!(of_class(MediaClass::Audio).count(), 8);
    }
}
