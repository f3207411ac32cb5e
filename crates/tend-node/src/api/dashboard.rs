//! The fleet dashboard at `GET /` of the HTTP API: one page, its HTML, CSS and JavaScript
//! embedded in the binary (no CDN, no build step, works offline).
//!
//! The page and its two assets are served without the API token, since they hold no data;
//! the script takes the token from the URL fragment (`#token=...`, never sent to the
//! server) or asks for it, keeps it in the tab's `sessionStorage`, and sends it as
//! `Authorization: Bearer` with every call: `/v1/status` every two seconds and
//! `/v1/changes` read as a `fetch` stream (an `EventSource` cannot send the header), so
//! the feed needs no token in its URL. A Content-Security-Policy keeps the page to its
//! own origin and scripts.

use axum::http::{header, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const PAGE: &str = include_str!("../../assets/dashboard.html");
const STYLE: &str = include_str!("../../assets/dashboard.css");
const SCRIPT: &str = include_str!("../../assets/dashboard.js");

/// The page's paths, served without the token.
const PUBLIC: [&str; 3] = ["/", "/dashboard.css", "/dashboard.js"];

/// Whether a request is for the page or its assets (which need no token).
pub(super) fn is_public(method: &Method, path: &str) -> bool {
    (method == Method::GET || method == Method::HEAD) && PUBLIC.contains(&path)
}

/// The page's routes, for a router of any state (they read none).
pub(super) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { asset(PAGE, "text/html; charset=utf-8") }),
        )
        .route(
            "/dashboard.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        .route(
            "/dashboard.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    r
}
