//! Accounts over HTTPS: register, login, logout, me, and role changes by an admin. Bodies are
//! small JSON objects; every answer is JSON (`{"error": ...}` on failure) so the page can show
//! the reason.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use streaming_core::token::unix_now;
use time::OffsetDateTime;

use crate::session::{SESSION_TTL_SECS, SessionClaims, bearer};
use crate::store::{self, StoreError, User, UserRole};
use crate::{AuthError, Chat, limits, password, throttle};

/// Account requests are a name and a password: anything bigger is not one.
const MAX_BODY: usize = 4096;

/// `account_rate` limits register and login per client address (password guessing).
pub fn router(
    chat: Arc<Chat>,
    account_rate: Arc<streaming_core::rate_limit::RateLimiter>,
) -> axum::Router {
    let limited =
        axum::middleware::from_fn_with_state(account_rate, streaming_core::rate_limit::enforce);
    axum::Router::new()
        .route(
            "/api/account/register",
            post(register).layer(limited.clone()),
        )
        .route("/api/account/login", post(login).layer(limited))
        .route("/api/account/logout", post(logout))
        .route("/api/account/me", get(me))
        .route("/api/account/role", post(set_role))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(chat)
}

/// A refusal with its reason, as `{"error": ...}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.0,
            [(header::CACHE_CONTROL, "no-store")],
            Json(serde_json::json!({ "error": self.1 })),
        )
            .into_response()
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    ApiError(status, message.into()).into_response()
}

fn unavailable() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "accounts are unavailable (database failover), retry shortly",
    )
}

fn store_error(e: StoreError) -> Response {
    match e {
        StoreError::Db(e) => {
            tracing::warn!("account request failed on the database: {e}");
            unavailable()
        }
        StoreError::NameTaken => error(StatusCode::CONFLICT, "that name is taken"),
        StoreError::NotFound(what) => error(StatusCode::NOT_FOUND, format!("{what} not found")),
        StoreError::Forbidden => error(StatusCode::FORBIDDEN, "only an admin may do that"),
        other => error(StatusCode::BAD_REQUEST, other.to_string()),
    }
}

fn auth_error(e: AuthError) -> Response {
    error(StatusCode::UNAUTHORIZED, e.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    name: String,
    password: String,
}

/// Parses the body ourselves so a malformed one gets our JSON error, not axum's text.
fn credentials(body: &[u8]) -> Result<Credentials, ApiError> {
    serde_json::from_slice(body).map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "expected a JSON object {\"name\": ..., \"password\": ...}".into(),
        )
    })
}

/// Makes a session row and its signed token.
async fn open_session(chat: &Chat, user: User, status: StatusCode) -> Response {
    let session = uuid::Uuid::new_v4();
    let expires = unix_now() + SESSION_TTL_SECS;
    let expires_at =
        OffsetDateTime::from_unix_timestamp(expires as i64).unwrap_or(OffsetDateTime::now_utc());
    let user_id = user.id;
    if let Err(e) = chat
        .retry(
            |pool| async move { store::create_session(&pool, session, user_id, expires_at).await },
        )
        .await
    {
        return store_error(e);
    }
    let token = chat.signer().sign(&SessionClaims {
        session,
        user_id: user.id,
        name: user.name.clone(),
        expires,
    });
    metrics::counter!("chat_sessions_opened_total").increment(1);
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        Json(serde_json::json!({ "session": token, "user": user })),
    )
        .into_response()
}

fn busy() -> Response {
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "busy checking passwords, retry in a moment",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn hash_error(e: password::HashError) -> Response {
    match e {
        password::HashError::Busy => busy(),
        password::HashError::Failed(e) => {
            tracing::error!("password hashing failed: {e}");
            error(StatusCode::INTERNAL_SERVER_ERROR, "password hashing failed")
        }
    }
}

/// Creates an account and logs it in. A taken name is a 409 and nothing else: the password
/// is not checked against the existing account, so register is no way around the login
/// throttle. Both answers cost one hash (it is made before the insert), so timing does not
/// tell them apart either.
async fn register(State(chat): State<Arc<Chat>>, body: axum::body::Bytes) -> Response {
    let creds = match credentials(&body) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if let Err(reason) = limits::check_name(&creds.name) {
        return error(StatusCode::BAD_REQUEST, reason);
    }
    if let Err(reason) = limits::check_password(&creds.password) {
        return error(StatusCode::BAD_REQUEST, reason);
    }
    let hash = match password::hash(creds.password).await {
        Ok(h) => h,
        Err(e) => return hash_error(e),
    };
    let name = creds.name;
    match chat
        .retry(|pool| {
            let (name, hash) = (name.clone(), hash.clone());
            async move { store::create_user(&pool, &name, &hash).await }
        })
        .await
    {
        Ok(user) => {
            tracing::info!(user = %user.name, "account registered");
            open_session(&chat, user, StatusCode::CREATED).await
        }
        Err(e) => store_error(e),
    }
}

async fn find(chat: &Chat, name: &str) -> Result<Option<(User, String)>, StoreError> {
    chat.retry(|pool| {
        let name = name.to_owned();
        async move { store::find_user(&pool, &name).await }
    })
    .await
}

/// Logs in, throttled by `throttle` (one count for every broadcast, taken before the password
/// is checked). While the database cannot count, nobody logs in.
async fn login(
    State(chat): State<Arc<Chat>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: axum::body::Bytes,
) -> Response {
    let creds = match credentials(&body) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let keys = throttle::Keys::new(&creds.name, peer.ip());
    let verdict = chat
        .retry(|pool| {
            let keys = keys.clone();
            async move { throttle::attempt(&pool, &keys, &throttle::RULE).await }
        })
        .await;
    match verdict {
        Ok(throttle::Verdict::Allowed) => {}
        Ok(throttle::Verdict::Refused { wait_secs, by }) => {
            metrics::counter!("chat_logins_refused_total", "reason" => by.as_str()).increment(1);
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                format!("too many failed logins, retry in {wait_secs} s"),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(wait_secs));
            return r;
        }
        Err(e) => {
            metrics::counter!("chat_logins_refused_total", "reason" => "database").increment(1);
            return store_error(e);
        }
    }
    // Oversized input is still checked (against the decoy) so timing says nothing.
    let found = if creds.name.len() <= 64 {
        match find(&chat, &creds.name).await {
            Ok(found) => found,
            Err(e) => return store_error(e),
        }
    } else {
        None
    };
    let (user, hash) = match found {
        Some((user, hash)) => (Some(user), Some(hash)),
        None => (None, None),
    };
    let ok = match password::verify(hash, creds.password).await {
        Ok(ok) => ok,
        Err(e) => {
            // Not checked, so not a failure: the count is given back.
            if let Err(e) = chat
                .retry(|pool| {
                    let keys = keys.clone();
                    async move { throttle::withdrawn(&pool, &keys).await }
                })
                .await
            {
                tracing::warn!("could not give back an unchecked login attempt: {e}");
            }
            return hash_error(e);
        }
    };
    match user {
        Some(user) if ok => {
            if let Err(e) = chat
                .retry(|pool| {
                    let keys = keys.clone();
                    async move { throttle::succeeded(&pool, &keys, &throttle::RULE).await }
                })
                .await
            {
                return store_error(e);
            }
            open_session(&chat, user, StatusCode::OK).await
        }
        _ => {
            metrics::counter!("chat_login_failures_total").increment(1);
            error(StatusCode::UNAUTHORIZED, "wrong name or password")
        }
    }
}

async fn logout(State(chat): State<Arc<Chat>>, headers: HeaderMap) -> Response {
    let Some(token) = bearer(&headers) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "no session (Authorization: Bearer ...)",
        );
    };
    let claims = match chat.signer().verify(token, unix_now()) {
        Ok(c) => c,
        Err(e) => return auth_error(e.into()),
    };
    let session = claims.session;
    match chat
        .retry(|pool| async move { store::delete_session(&pool, session).await })
        .await
    {
        Ok(()) => {
            chat.forget_session(session);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => store_error(e),
    }
}

async fn current_user(chat: &Chat, headers: &HeaderMap) -> Result<User, ApiError> {
    let token = bearer(headers).ok_or_else(|| {
        ApiError(
            StatusCode::UNAUTHORIZED,
            "no session (Authorization: Bearer ...)".into(),
        )
    })?;
    chat.authenticate(token)
        .await
        .map_err(|e| ApiError(StatusCode::UNAUTHORIZED, e.to_string()))
}

async fn me(State(chat): State<Arc<Chat>>, headers: HeaderMap) -> Response {
    match current_user(&chat, &headers).await {
        Ok(user) => (
            [(header::CACHE_CONTROL, "no-store")],
            Json(serde_json::json!({ "user": user })),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleChange {
    name: String,
    role: UserRole,
}

async fn set_role(
    State(chat): State<Arc<Chat>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let admin = match current_user(&chat, &headers).await {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    if admin.role != UserRole::Admin {
        return error(StatusCode::FORBIDDEN, "only an admin may change roles");
    }
    let Ok(change) = serde_json::from_slice::<RoleChange>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected {\"name\": ..., \"role\": \"viewer\"|\"moderator\"|\"admin\"}",
        );
    };
    match chat
        .retry(|pool| {
            let (admin, name) = (admin.clone(), change.name.clone());
            async move { store::set_role(&pool, &admin, &name, change.role).await }
        })
        .await
    {
        Ok(Some(user)) => {
            tracing::info!(by = %admin.name, user = %user.name, role = user.role.as_str(), "role changed");
            Json(serde_json::json!({ "user": user })).into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, "no such user"),
        Err(StoreError::Forbidden) => error(
            StatusCode::FORBIDDEN,
            "an admin's role is changed only by that admin",
        ),
        Err(e) => store_error(e),
    }
}
