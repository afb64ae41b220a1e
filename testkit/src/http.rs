//! Plain-HTTP helpers shared by the REST clients and the worker process.

use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Timeout of one request.
const TIMEOUT: Duration = Duration::from_secs(60);

/// A plain-HTTP client for local services: no proxy, bounded timeouts.
///
/// It is bound to the tokio runtime it is first used on: create one per test.
pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .timeout(TIMEOUT)
        .build()
        .expect("invariant: a plain-http client (no TLS backend) always builds")
}

/// Sends a request; returns status and body when the status is a success or
/// one of `accept`, otherwise an error with the response body.
pub(crate) async fn send(
    request: reqwest::RequestBuilder,
    what: &str,
    accept: &[u16],
) -> Result<(u16, Vec<u8>)> {
    let response = request
        .send()
        .await
        .with_context(|| format!("{what}: request failed"))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .with_context(|| format!("{what}: reading the response body"))?;
    if !status.is_success() && !accept.contains(&status.as_u16()) {
        bail!("{what}: http {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok((status.as_u16(), body.to_vec()))
}

/// `body` parsed as JSON, or an error that shows it.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(body)
        .with_context(|| format!("{what}: unexpected response {}", String::from_utf8_lossy(body)))
}

/// Percent-encodes everything but RFC 3986 unreserved characters, for URL path
/// segments (object names contain `/`) and query values.
pub(crate) fn encode(value: &str) -> String {
    const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(value, UNRESERVED).to_string()
}

/// GETs `http://127.0.0.1:PORT/PATH`: status and body, `None` while nothing listens there.
pub async fn http_get(port: u16, path: &str) -> Result<Option<(u16, String)>> {
    get(&client(), port, path).await
}

/// [`http_get`] with a client of the caller's.
pub(crate) async fn get(client: &reqwest::Client, port: u16, path: &str) -> Result<Option<(u16, String)>> {
    let request = client
        .get(format!("http://127.0.0.1:{port}{path}"))
        .timeout(Duration::from_secs(5));
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) if error.is_connect() => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    let status = response.status().as_u16();
    Ok(Some((status, response.text().await?)))
}
