//! The dashboard's HTML, server-rendered with maud (templates compiled into the binary, every
//! interpolation escaped). Each page is a layout around a `#live` region; the vendored script
//! (`assets/ui.js`) re-fetches that region alone (`x-outpost-live: 1`) to stay live.

use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::model::{
    AllocationRow, ComponentStatus, FleetPage, NodePage, NodeRow, ServiceRow, short_generation,
};
use crate::projection::NodeState;

/// One line of the event log tail.
pub struct EventRow {
    pub event_id: u64,
    pub at_unix_ms: u64,
    pub kind: String,
    pub aggregate: String,
    pub actor: String,
}

/// Which tab is current in the navigation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Fleet,
    Services,
    Events,
}

/// Relative time, e.g. `12 s ago`.
pub fn ago(now_unix_ms: u64, then_unix_ms: Option<u64>) -> String {
    let Some(then) = then_unix_ms else {
        return "never".into();
    };
    let secs = now_unix_ms.saturating_sub(then) / 1000;
    match secs {
        0..=119 => format!("{secs} s ago"),
        120..=7199 => format!("{} min ago", secs / 60),
        7200..=172_799 => format!("{} h ago", secs / 3600),
        _ => format!("{} d ago", secs / 86_400),
    }
}

fn state_badge(state: NodeState) -> Markup {
    html! { span class={"badge state-" (state.as_str())} { (state.as_str()) } }
}

/// The page around a live region. `live` is what the script refreshes.
pub fn layout(
    title: &str,
    org: Option<&str>,
    tab: Option<Tab>,
    before: Markup,
    live: Markup,
) -> Markup {
    let current = |this: Tab| {
        if tab == Some(this) {
            Some("page")
        } else {
            None
        }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Outpost" }
                link rel="stylesheet" href="/ui/assets/ui.css";
                script src="/ui/assets/ui.js" defer {}
            }
            body {
                a class="skip" href="#main" { "Skip to content" }
                header {
                    span class="brand" { "Outpost" }
                    @if let Some(org) = org {
                        nav aria-label="Main" {
                            a href="/ui/" aria-current=[current(Tab::Fleet)] { "Fleet" }
                            a href="/ui/services" aria-current=[current(Tab::Services)] { "Services" }
                            a href="/ui/events" aria-current=[current(Tab::Events)] { "Events" }
                        }
                        span class="org" { "org " strong { (org) } }
                        form method="post" action="/ui/logout" class="logout" {
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main id="main" tabindex="-1" {
                    h1 { (title) }
                    (before)
                    div id="live" data-live=[org.map(|_| "1")] {
                        (live)
                    }
                    @if org.is_some() {
                        p class="updated" role="status" aria-live="off" id="updated" { "Live: refreshes every 2 s." }
                    }
                }
            }
        }
    }
}

/// The login page; `error` is shown in an alert.
pub fn login(csrf: &str, error: Option<&str>) -> Markup {
    let form = html! {
        @if let Some(error) = error {
            p class="error" role="alert" id="login-error" { (error) }
        }
        form method="post" action="/ui/login" class="login" {
            input type="hidden" name="csrf" value=(csrf);
            label for="token" { "Operator token" }
            input id="token" name="token" type="password" autocomplete="off" required
                aria-describedby=[error.map(|_| "login-error")];
            button type="submit" { "Log in" }
        }
        p class="hint" { "Use a token from " code { "outpostctl tokens create" } " with the " code { "read" } " or " code { "admin" } " scope. The dashboard is read-only." }
    };
    layout("Log in", None, None, form, html! {})
}

/// An error page (404, 400, 414).
pub fn error_page(org: Option<&str>, title: &str, message: &str) -> Markup {
    layout(
        title,
        org,
        None,
        html! { p class="error" role="alert" { (message) } p { a href="/ui/" { "Back to the fleet" } } },
        html! {},
    )
}

fn component_cell(component: &ComponentStatus) -> Markup {
    html! {
        li class={"component comp-" (component.state)} {
            span class="comp-name" { (component.name) }
            " "
            span class="comp-state" { (component.state) }
            @if !component.detail.is_empty() { " " span class="comp-detail" { (component.detail) } }
            @if let Some(error) = &component.last_error {
                br; span class="comp-error" { "last error: " (error) }
            }
        }
    }
}

fn plan_cell(row: &NodeRow) -> Markup {
    let desired = row.desired_generation.as_deref().map(short_generation);
    let applied = row.applied_generation.as_deref().map(short_generation);
    html! {
        span class={ @if row.in_sync() { "sync" } @else { "behind" } } {
            @if row.in_sync() { "in sync " } @else { "behind " }
        }
        span class="gen" { "desired " code { (desired.unwrap_or_else(|| "—".into())) } ", applied " code { (applied.unwrap_or_else(|| "—".into())) } }
    }
}

fn labels_cell(labels: &[(String, String)]) -> Markup {
    html! {
        @if labels.is_empty() { "—" }
        @for (key, value) in labels { code class="label" { (key) "=" (value) } " " }
    }
}

fn page_link(page: &FleetPage, number: usize) -> String {
    let mut query = vec![("page", number.to_string())];
    if let Some(state) = page.filter.state {
        query.push(("state", state.as_str().to_string()));
    }
    if !page.filter.search.is_empty() {
        query.push(("q", page.filter.search.clone()));
    }
    format!(
        "/ui/?{}",
        serde_urlencoded::to_string(&query).unwrap_or_default()
    )
}

/// The fleet page's filter form (the live script leaves the region alone while it has focus).
fn fleet_filter(page: &FleetPage) -> Markup {
    let selected = |state: Option<NodeState>| page.filter.state == state;
    html! {
        form method="get" action="/ui/" class="filter" role="search" {
            label for="state" { "State" }
            select id="state" name="state" {
                option value="all" selected[selected(None)] { "all" }
                option value="ready" selected[selected(Some(NodeState::Ready))] { "ready" }
                option value="down" selected[selected(Some(NodeState::Down))] { "down" }
                option value="revoked" selected[selected(Some(NodeState::Revoked))] { "revoked" }
            }
            label for="q" { "Node id or hostname" }
            input id="q" name="q" type="search" maxlength="63" value=(page.filter.search);
            button type="submit" { "Filter" }
        }
    }
}

/// The fleet at a glance: counts by state, then one page of the node list.
pub fn fleet(page: &FleetPage, now_unix_ms: u64) -> Markup {
    let counts = page.counts;
    html! {
        section aria-label="Fleet at a glance" {
            ul class="counts" id="counts" {
                li class="count state-ready" { a href="/ui/?state=ready" { span class="n" id="count-ready" { (counts.ready) } " ready" } }
                li class="count state-down" { a href="/ui/?state=down" { span class="n" id="count-down" { (counts.down) } " down" } }
                li class="count state-revoked" { a href="/ui/?state=revoked" { span class="n" id="count-revoked" { (counts.revoked) } " revoked" } }
                li class="count" { a href="/ui/" { span class="n" { (counts.nodes()) } " nodes" } }
                li class="count" { a href="/ui/services" { span class="n" { (counts.services) } " services" } }
                li class="count" { span class="n" { (counts.allocations) } " allocations" }
            }
        }
        (fleet_filter(page))
        div class="scroll" {
            table class="nodes" id="nodes" {
                caption {
                    (page.matching) " matching nodes · page " (page.filter.page) " of " (page.pages)
                    " · " (super::model::NODES_PER_PAGE) " a page"
                }
                thead {
                    tr {
                        th scope="col" { "Node" }
                        th scope="col" { "State" }
                        th scope="col" { "Last seen" }
                        th scope="col" { "Role" }
                        th scope="col" { "Arch" }
                        th scope="col" { "Labels" }
                        th scope="col" { "Agent" }
                        th scope="col" { "Plan" }
                        th scope="col" { "Components" }
                    }
                }
                tbody {
                    @if page.rows.is_empty() {
                        tr { td colspan="9" { "No node matches." } }
                    }
                    @for row in &page.rows {
                        tr id={"node-" (row.node_id)} data-state=(row.state.as_str()) {
                            th scope="row" { a href={"/ui/nodes/" (row.node_id)} { (row.node_id) } br; small { (row.hostname) } }
                            td class="node-state" { (state_badge(row.state)) }
                            td { (ago(now_unix_ms, row.last_seen_unix_ms)) }
                            td { (row.role) }
                            td { (row.arch) }
                            td { (labels_cell(&row.labels)) }
                            td { (row.agent_version.as_deref().unwrap_or("—")) }
                            td { (plan_cell(row)) }
                            td { ul class="components" { @for c in &row.components { (component_cell(c)) } } }
                        }
                    }
                }
            }
        }
        nav class="pager" aria-label="Pages" {
            @if page.filter.page > 1 {
                a rel="prev" href=(page_link(page, page.filter.page - 1)) { "← Previous" }
            }
            @if page.filter.page < page.pages {
                a rel="next" href=(page_link(page, page.filter.page + 1)) { "Next →" }
            }
        }
    }
}

fn allocations_table(allocations: &[AllocationRow], now_unix_ms: u64) -> Markup {
    html! {
        div class="scroll" {
            table id="allocations" {
                caption { "Allocations" }
                thead { tr {
                    th scope="col" { "Allocation" } th scope="col" { "Service" } th scope="col" { "Replica" }
                    th scope="col" { "State" } th scope="col" { "Restarts" } th scope="col" { "Reported" } th scope="col" { "Message" }
                } }
                tbody {
                    @if allocations.is_empty() { tr { td colspan="7" { "No allocation on this node." } } }
                    @for a in allocations {
                        tr {
                            th scope="row" { code { (a.allocation_id) } }
                            td { (a.service) }
                            td { (a.replica) }
                            td { (a.state.map_or("unreported", |s| s.as_str())) }
                            td { (a.restarts) }
                            td { (ago(now_unix_ms, a.reported_at_unix_ms)) }
                            td { (a.message) }
                        }
                    }
                }
            }
        }
    }
}

/// One node: facts, components, allocations, overlay peers and its recent events.
pub fn node(page: &NodePage, events: &[EventRow], now_unix_ms: u64) -> Markup {
    let row = &page.row;
    html! {
        dl class="facts" {
            dt { "State" } dd id="node-state" { (state_badge(row.state)) }
            dt { "Last seen" } dd { (ago(now_unix_ms, row.last_seen_unix_ms)) }
            dt { "Hostname" } dd { (row.hostname) }
            dt { "Role" } dd { (row.role) }
            dt { "Arch" } dd { (row.arch) }
            dt { "Scheduling" } dd { (page.scheduling) }
            dt { "Agent" } dd { (row.agent_version.as_deref().unwrap_or("—")) }
            dt { "Labels" } dd { (labels_cell(&row.labels)) }
            dt { "Plan" } dd { (plan_cell(row)) }
            dt { "Overlay address" } dd { (page.overlay_address.as_deref().unwrap_or("—")) }
        }
        h2 { "Components" }
        ul class="components wide" id="components" { @for c in &row.components { (component_cell(c)) } }
        h2 { "Allocations" }
        (allocations_table(&page.allocations, now_unix_ms))
        h2 { "Overlay peers" }
        div class="scroll" {
            table id="peers" {
                caption { "Overlay peers" }
                thead { tr { th scope="col" { "Peer" } th scope="col" { "Address" } th scope="col" { "Endpoints" } th scope="col" { "State" } } }
                tbody {
                    @if page.peers.is_empty() { tr { td colspan="4" { "No overlay peer." } } }
                    @for peer in &page.peers {
                        tr {
                            th scope="row" { a href={"/ui/nodes/" (peer.node_id)} { (peer.node_id) } }
                            td { code { (peer.address) } }
                            td { (peer.endpoints.join(", ")) }
                            td { @if let Some(state) = peer.state { (state_badge(state)) } @else { "—" } }
                        }
                    }
                }
            }
        }
        h2 { "Recent events" }
        (events_table(events, "Recent events of this node", now_unix_ms))
    }
}

/// Services with their newest release and allocations by state.
pub fn services(rows: &[ServiceRow], now_unix_ms: u64) -> Markup {
    html! {
        div class="scroll" {
            table id="services" {
                caption { (rows.len()) " services" }
                thead { tr {
                    th scope="col" { "Service" } th scope="col" { "Release" } th scope="col" { "Replicas" }
                    th scope="col" { "Allocations by state" } th scope="col" { "Rollout" } th scope="col" { "Updated" }
                } }
                tbody {
                    @if rows.is_empty() { tr { td colspan="6" { "No service." } } }
                    @for row in rows {
                        tr {
                            th scope="row" { (row.name) }
                            td { (row.release) }
                            td { (row.replicas) }
                            td {
                                (row.allocations) " "
                                @for (state, count) in &row.states { span class={"badge alloc-" (state)} { (count) " " (state) } " " }
                            }
                            td {
                                @if let Some(rollout) = &row.rollout {
                                    span class={"badge rollout-" (rollout.state)} { (rollout.state) }
                                    " " (rollout.from_release) " → " (rollout.release) ": batch " (rollout.batches)
                                    ", " (rollout.admitted) " of " (row.allocations) " admitted"
                                    @if let Some(reason) = &rollout.halt_reason { br; span class="comp-error" { "halted: " (reason) } }
                                } @else { "—" }
                            }
                            td { (ago(now_unix_ms, Some(row.updated_at_unix_ms))) }
                        }
                    }
                }
            }
        }
    }
}

/// The event log tail.
pub fn events_table(events: &[EventRow], caption: &str, now_unix_ms: u64) -> Markup {
    html! {
        div class="scroll" {
            table class="events" {
                caption { (caption) }
                thead { tr { th scope="col" { "Event" } th scope="col" { "When" } th scope="col" { "Kind" } th scope="col" { "Aggregate" } th scope="col" { "Actor" } } }
                tbody {
                    @if events.is_empty() { tr { td colspan="5" { "No event." } } }
                    @for e in events {
                        tr {
                            th scope="row" { (e.event_id) }
                            td { (ago(now_unix_ms, Some(e.at_unix_ms))) }
                            td { (e.kind) }
                            td { code { (e.aggregate) } }
                            td { (e.actor) }
                        }
                    }
                }
            }
        }
    }
}

/// An empty marker so callers can pass "nothing before the live region".
pub fn nothing() -> Markup {
    PreEscaped(String::new())
}
