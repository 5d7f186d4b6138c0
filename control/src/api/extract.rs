//! Request extractors whose rejections are [`ApiError`]s, so a bad path or query answers with
//! the same JSON error body as every other refusal (axum's own answer it as plain text).

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// `Path<T>` that rejects with `400 invalid_field` naming `path` and the request path.
pub struct ApiPath<T>(pub T);

/// `Query<T>` that rejects with `400 invalid_field` naming `query` and the query string.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(path_rejection(&rejection, parts.uri.path())),
        }
    }
}

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(query_rejection(
                &rejection,
                parts.uri.query().unwrap_or_default(),
            )),
        }
    }
}

/// A path that does not decode (e.g. a percent-encoded byte that is not UTF-8).
fn path_rejection(rejection: &PathRejection, path: &str) -> ApiError {
    ApiError::invalid("path", rejection.body_text(), path)
}

/// A query string that does not decode into what the endpoint reads.
fn query_rejection(rejection: &QueryRejection, query: &str) -> ApiError {
    ApiError::invalid("query", rejection.body_text(), query)
}

#[cfg(test)]
mod tests {
    use axum::http::Request;
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    struct WaitQuery {
        #[allow(dead_code)] // read only by serde: the test wants the rejection
        wait_secs: u32,
    }

    fn parts(uri: &str) -> Parts {
        Request::builder().uri(uri).body(()).unwrap().into_parts().0
    }

    #[tokio::test]
    async fn a_query_that_does_not_decode_names_the_query() {
        let mut request = parts("/v1/x?wait_secs=soon");
        let Err(error) = ApiQuery::<WaitQuery>::from_request_parts(&mut request, &()).await else {
            panic!("wait_secs=soon is not a number")
        };
        let body = error.body();
        assert_eq!(body.error, "invalid_field");
        assert_eq!(
            (body.field.as_deref(), body.value.as_deref()),
            (Some("query"), Some("wait_secs=soon"))
        );
        assert!(body.message.contains("wait_secs"), "{}", body.message);
    }
}
