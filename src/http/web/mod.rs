//! The web page at `GET /`: a form to start a job, its live trajectory, the diff, the pull
//! request and the cost, recent jobs and a cancel button.
//!
//! The files beside this module are plain HTML, CSS and JavaScript modules, embedded in the
//! binary: nothing is built to run the service, nothing is fetched from another site, and the
//! page works offline. They are served under a strict Content-Security-Policy (scripts and styles
//! from this origin only, no inline code, no framing), so the page itself is no way to inject
//! script. The page talks to the same API as any other client (see `app.js`).

use std::sync::Arc;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::{ApiError, AppState};

/// What a browser may load and run on the page: only what this origin serves.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; \
     object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const INDEX: &str = include_str!("index.html");

const ASSETS: &[Asset] = &[
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("app.js"),
    },
    Asset {
        name: "api.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("api.js"),
    },
    Asset {
        name: "stream.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("stream.js"),
    },
    Asset {
        name: "trajectory.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("trajectory.js"),
    },
    Asset {
        name: "dom.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("dom.js"),
    },
    Asset {
        name: "diff.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("diff.js"),
    },
    Asset {
        name: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("style.css"),
    },
    Asset {
        name: "icon.svg",
        content_type: "image/svg+xml",
        body: include_str!("icon.svg"),
    },
];

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(index))
        .route("/assets/{name}", get(asset))
}

/// The web page: submit a job, follow it live, see the diff and the PR, cancel.
#[utoipa::path(
    get,
    path = "/",
    tag = "service",
    responses(
        (status = 200, description = "The page", content_type = "text/html", body = String)
    )
)]
pub async fn index() -> Response {
    with_page_headers("text/html; charset=utf-8", INDEX)
}

/// The page's scripts, style sheet and icon.
#[utoipa::path(
    get,
    path = "/assets/{name}",
    tag = "service",
    params(("name" = String, Path, description = "`app.js`, `style.css`, …")),
    responses(
        (status = 200, description = "The file", content(
            (String = "text/javascript"),
            (String = "text/css"),
            (String = "image/svg+xml")
        )),
        (status = 404, description = "No such file", body = crate::http::openapi::ErrorBody)
    )
)]
pub async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|asset| asset.name == name) {
        Some(asset) => with_page_headers(asset.content_type, asset.body),
        None => ApiError::not_found("no such file").into_response(),
    }
}

fn with_page_headers(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            // The files change with the binary; a revalidation is cheap next to a stale page.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values of `attribute="…"` in `html`.
    fn attribute_values<'a>(html: &'a str, attribute: &str) -> Vec<&'a str> {
        let marker = format!(" {attribute}=\"");
        html.split(marker.as_str())
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .collect()
    }

    /// Every file the page loads is one this module serves, from this origin, and the page has
    /// no inline script or style for the policy to block.
    #[test]
    fn the_page_loads_only_its_own_files() {
        let served = |path: &str| {
            path.strip_prefix("/assets/")
                .is_some_and(|name| ASSETS.iter().any(|asset| asset.name == name))
        };
        let mut loaded: Vec<String> = ["src", "href"]
            .iter()
            .flat_map(|attribute| attribute_values(INDEX, attribute))
            .filter(|value| !value.starts_with('#'))
            .map(str::to_owned)
            .collect();
        // Module imports (`import … from './x.js'`) resolve under /assets/ too.
        for asset in ASSETS.iter().filter(|a| a.name.ends_with(".js")) {
            for line in asset.body.lines().filter(|l| l.starts_with("import ")) {
                let spec = line.split('\'').nth(1).unwrap_or(line);
                loaded.push(spec.replacen("./", "/assets/", 1));
            }
        }
        assert!(loaded.iter().any(|path| path == "/assets/app.js"));
        assert!(loaded.len() >= 8, "{loaded:?}");
        for path in &loaded {
            assert!(served(path), "{path} is loaded by the page but not served");
        }
        assert!(!INDEX.contains("<script>") && !INDEX.contains(" style=\""));
        let inline_handler = INDEX.split(" on").skip(1).any(|rest| {
            let name_end = rest.find(|c: char| !c.is_ascii_lowercase()).unwrap_or(0);
            name_end > 0 && rest[name_end..].starts_with("=\"")
        });
        assert!(!inline_handler, "an inline event handler");
    }
}
