//! Images: JPEG, PNG and WebP headers with sane dimensions.

use super::{ImageMedia, MAX_IMAGE_SIDE, NotMedia, Probed, not_media};
use crate::content::{self};

/// Probes the head of an image (the first bytes suffice for JPEG, PNG and WebP).
pub fn probe_image(head: &[u8]) -> Result<Probed<ImageMedia>, NotMedia> {
    if head.is_empty() {
        return Err(not_media("is empty"));
    }
    let (format, name) = match imagesize::image_type(head) {
        Ok(imagesize::ImageType::Jpeg) => ("jpeg", "jpg"),
        Ok(imagesize::ImageType::Png) => ("png", "png"),
        Ok(imagesize::ImageType::Webp) => ("webp", "webp"),
        Ok(other) => {
            return Err(not_media(format!("is a {other:?} image, not JPEG, PNG or WebP")));
        }
        Err(_) => return Err(not_media("is not a recognised image (JPEG, PNG or WebP)")),
    };
    let size = imagesize::blob_size(head)
        .map_err(|error| not_media(format!("is a {format} image whose size cannot be read ({error})")))?;
    if size.width == 0 || size.height == 0 {
        return Err(not_media(format!(
            "is a {format} image of {}x{} pixels",
            size.width, size.height
        )));
    }
    if size.width > MAX_IMAGE_SIDE || size.height > MAX_IMAGE_SIDE {
        return Err(not_media(format!(
            "is a {format} image of {}x{} pixels, more than {MAX_IMAGE_SIDE} per side",
            size.width, size.height
        )));
    }
    let content_type = content::from_extension(name).ok_or_else(|| not_media("no content type"))?;
    Ok(Probed {
        content_type,
        media: ImageMedia {
            format,
            width: size.width as u32,
            height: size.height as u32,
        },
    })
}
