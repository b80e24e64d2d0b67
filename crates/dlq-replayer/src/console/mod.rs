//! The operator's console: server-rendered pages under `/ui` on the admin API's port.
//! Overview (every stage's health, flow and spend, the kill switch), dead letters (filter,
//! inspect, dry run, replay with progress, discard), one event's whole story, and spend.
//! Reads and actions go through the same functions as the admin API (`replay`), under
//! the same tokens: the read token looks, the admin token acts.

mod dead_letters;
mod events;
mod fresh;
pub mod html;
mod jobs;
mod overview;
pub mod sampler;
pub mod session;
mod spend;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use enrich_common::shutdown::Shutdown;
use std::sync::Arc;
use std::time::Duration;

use crate::api::Api;
use html::{Nav, Viewer, e};
use session::{Session, Sessions};

pub struct Console {
    pub api: Arc<Api>,
    pub sessions: Sessions,
    pub sampler: Arc<sampler::Sampler>,
    pub jobs: jobs::Jobs,
    /// The keys by state, for the overview.
    keys: fresh::Fresh<overview::States>,
    /// The spend page's tables, as HTML.
    spend: fresh::Fresh<String>,
}

impl Console {
    pub fn new(api: Arc<Api>) -> Self {
        let settings = &api.replayer.settings;
        Self {
            sessions: Sessions::new(Duration::from_secs(settings.ui.session_ttl_secs)),
            sampler: Arc::new(sampler::Sampler::new(settings)),
            jobs: jobs::Jobs::default(),
            keys: fresh::Fresh::new(overview::KEYS_TTL),
            spend: fresh::Fresh::new(spend::TTL),
            api,
        }
    }

    fn pipeline(&self) -> &str {
        &self.api.replayer.settings.pipeline.name
    }

    fn pool(&self) -> &sqlx::PgPool {
        &self.api.replayer.pool
    }
}

/// The console's routes, and its sampler started until `shutdown`.
pub fn routes(api: Arc<Api>, shutdown: Shutdown) -> Router {
    let console = Arc::new(Console::new(api));
    console.sampler.clone().spawn(shutdown);
    Router::new()
        .route("/ui", get(overview::page))
        .route("/ui/", get(overview::page))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", axum::routing::post(logout))
        .route("/ui/kill-switch", axum::routing::post(overview::kill_switch))
        .route("/ui/dead-letters", get(dead_letters::list))
        .route("/ui/dead-letters/preview", axum::routing::post(dead_letters::preview))
        .route("/ui/dead-letters/replay", axum::routing::post(dead_letters::replay))
        .route("/ui/dead-letters/{id}", get(dead_letters::show))
        .route("/ui/dead-letters/{id}/discard", axum::routing::post(dead_letters::discard))
        .route("/ui/jobs/{id}", get(dead_letters::job))
        .route("/ui/events", get(events::search))
        .route("/ui/event", get(events::event))
        .route("/ui/spend", get(spend::page))
        .route("/ui/assets/console.css", get(|| async { asset("text/css", include_str!("assets/console.css")) }))
        .route("/ui/assets/console.js", get(|| async { asset("text/javascript", include_str!("assets/console.js")) }))
        .route("/ui/{*rest}", get(not_found))
        .layer(axum::middleware::from_fn_with_state(console.clone(), gate))
        .with_state(console)
}

/// Whether a path is open without a session: the login form and the static assets.
fn is_public(path: &str) -> bool {
    path == "/ui/login" || path.starts_with("/ui/assets/")
}

/// Before any handler (and so before its extractors can answer a malformed path or query
/// on their own): a request without a session reaches only the login and the assets; a
/// page goes to the login, an action is refused. After it: every answer, the extractors'
/// rejections included, carries the console's security headers.
async fn gate(
    State(console): State<Arc<Console>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path().to_string();
    if !is_public(&path) && console.sessions.get(request.headers()).is_none() {
        return match *request.method() {
            axum::http::Method::GET | axum::http::Method::HEAD if wants_fragment(request.headers()) => {
                secure(StatusCode::UNAUTHORIZED.into_response())
            }
            axum::http::Method::GET | axum::http::Method::HEAD => redirect("/ui/login"),
            _ => problem(None, StatusCode::FORBIDDEN, "Refused", "log in with the admin token to act"),
        };
    }
    let response = next.run(request).await;
    if response.headers().contains_key(header::CONTENT_SECURITY_POLICY) || path.starts_with("/ui/assets/") {
        response
    } else {
        secure(response)
    }
}

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

fn secure(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Not `no-referrer`: with it a browser sends `Origin: null` on the console's own form posts.
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=300"));
    r.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    r
}

/// An HTML answer.
fn html_response(status: StatusCode, body: String) -> Response {
    secure((status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response())
}

fn redirect(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    secure(r)
}

/// Only the `<main>` part, for the overview's refresh in place.
fn wants_fragment(headers: &HeaderMap) -> bool {
    headers.get("x-console-fragment").is_some()
}

/// A page for a viewer: the whole frame, or only its `<main>` when the page's script asks.
fn render(headers: &HeaderMap, session: &Session, title: &str, nav: Nav, refresh: Option<u64>, main: &str) -> Response {
    if wants_fragment(headers) {
        return html_response(StatusCode::OK, main.to_string());
    }
    let viewer = Viewer { role: session.role.label(), csrf: &session.csrf };
    html_response(StatusCode::OK, html::page(title, nav, Some(&viewer), refresh, main))
}

/// A page that says what went wrong, in the frame.
fn problem(session: Option<&Session>, status: StatusCode, title: &str, message: &str) -> Response {
    let main = format!("<h1>{}</h1><p role=\"alert\">{}</p>", e(title), e(message));
    let viewer = session.map(|s| Viewer { role: s.role.label(), csrf: &s.csrf });
    html_response(status, html::page(title, Nav::None, viewer.as_ref(), None, &main))
}

fn internal(session: &Session, err: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %err, "console page failed");
    problem(Some(session), StatusCode::INTERNAL_SERVER_ERROR, "Something failed", &err.to_string())
}

/// The viewer of a page, or the answer that sends them to the login.
fn look(console: &Console, headers: &HeaderMap) -> Result<Session, Box<Response>> {
    match console.sessions.get(headers) {
        Some(s) => Ok(s),
        None if wants_fragment(headers) => Err(Box::new(secure(StatusCode::UNAUTHORIZED.into_response()))),
        None => Err(Box::new(redirect("/ui/login"))),
    }
}

/// The form fields of a POST body (urlencoded; a name may repeat).
pub struct Form(Vec<(String, String)>);

impl Form {
    fn parse(body: &[u8]) -> Self {
        Self(url::form_urlencoded::parse(body).into_owned().collect())
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// A field given and not blank.
    fn text(&self, name: &str) -> Option<String> {
        self.get(name).map(str::trim).filter(|v| !v.is_empty()).map(str::to_string)
    }

    fn all(&self, name: &str) -> impl Iterator<Item = &str> {
        self.0.iter().filter(move |(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// An action's session: refused (403) without a session, without the admin token's, from
/// another origin or without the session's form token.
fn act(console: &Console, headers: &HeaderMap, form: &Form) -> Result<Session, Box<Response>> {
    let refused = |why: &str| Box::new(problem(None, StatusCode::FORBIDDEN, "Refused", why));
    if !session::same_origin(headers) {
        return Err(refused("the request did not come from the console's own pages"));
    }
    let Some(s) = console.sessions.get(headers) else {
        return Err(refused("log in with the admin token to act"));
    };
    if !session::csrf_ok(&s, form.get("csrf")) {
        let why = "the form is stale or forged: reload the page";
        return Err(Box::new(problem(Some(&s), StatusCode::FORBIDDEN, "Refused", why)));
    }
    if !s.role.may_act() {
        let why = "the read token may look; acting needs the admin token";
        return Err(Box::new(problem(Some(&s), StatusCode::FORBIDDEN, "Refused", why)));
    }
    Ok(s)
}

/// The hidden form token of a session's forms.
fn csrf_field(s: &Session) -> String {
    format!("<input type=\"hidden\" name=\"csrf\" value=\"{}\">", e(&s.csrf))
}

fn login_form(message: Option<&str>, open: bool) -> String {
    let mut main = String::from("<h1>Log in</h1>");
    if let Some(m) = message {
        main.push_str(&format!("<p class=\"error\" role=\"alert\">{}</p>", e(m)));
    }
    let hint = if open {
        "No token is configured: leave the field empty to look (payloads withheld, no actions)."
    } else {
        "The read token may look; the admin token may also pause, replay and discard."
    };
    main.push_str(&format!(
        "<form method=\"post\" action=\"/ui/login\" class=\"login\">\
         <label for=\"token\">Token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" {} autofocus>\
         <p class=\"muted\">{}</p><button type=\"submit\">Log in</button></form>",
        if open { "" } else { "required" },
        e(hint)
    ));
    main
}

async fn login_page(State(console): State<Arc<Console>>) -> Response {
    let open = console.api.access.is_open();
    html_response(StatusCode::OK, html::page("Log in", Nav::None, None, None, &login_form(None, open)))
}

async fn login(State(console): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Response {
    let open = console.api.access.is_open();
    if !session::same_origin(&headers) {
        return problem(
            None,
            StatusCode::FORBIDDEN,
            "Refused",
            "the request did not come from the console's own pages",
        );
    }
    let form = Form::parse(&body);
    let token = form.get("token").unwrap_or("").trim();
    match session::role_of(&console.api.access, token) {
        Some(role) => {
            // A session the browser held before this login ends with it.
            console.sessions.close(&headers);
            let (id, _) = console.sessions.open(role);
            tracing::info!(role = role.label(), "console login");
            let mut r = redirect("/ui");
            if let Ok(v) = HeaderValue::from_str(&console.sessions.set_cookie(&id)) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        None => {
            tracing::warn!("console login refused: wrong token");
            let page = html::page("Log in", Nav::None, None, None, &login_form(Some("That token is not valid."), open));
            html_response(StatusCode::UNAUTHORIZED, page)
        }
    }
}

async fn logout(State(console): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Response {
    let form = Form::parse(&body);
    let Some(s) = console.sessions.get(&headers) else { return redirect("/ui/login") };
    if !session::same_origin(&headers) || !session::csrf_ok(&s, form.get("csrf")) {
        return problem(Some(&s), StatusCode::FORBIDDEN, "Refused", "the form is stale or forged: reload the page");
    }
    console.sessions.close(&headers);
    let mut r = redirect("/ui/login");
    if let Ok(v) = HeaderValue::from_str(&Sessions::clear_cookie()) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn not_found(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    match look(&console, &headers) {
        Ok(s) => problem(Some(&s), StatusCode::NOT_FOUND, "Not found", "There is no such page."),
        Err(r) => *r,
    }
}
