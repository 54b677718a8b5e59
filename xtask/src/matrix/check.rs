//! What `netlens check` said on one kernel: its features (status and the
//! hook serving each) and failed checks, from `--json` or, for a netlens
//! without it, from the plain table.

use serde_json::Value;

/// What `netlens check` said.
pub(super) struct CheckReport {
    pub(super) exit_ok: bool,
    /// "exit 0", "exit 1", "timed out after 60 s".
    pub(super) exit: String,
    /// From `--json`; empty when this netlens prints only the table.
    pub(super) features: Vec<Feature>,
    /// Checks that were not ok: (check, detail).
    pub(super) failed_checks: Vec<(String, String)>,
    /// `--json` was understood.
    pub(super) json: bool,
}

pub(super) struct Feature {
    pub(super) name: String,
    pub(super) status: String,
    pub(super) hook: String,
    pub(super) why: String,
}

impl Feature {
    /// The matrix cell: the status and the kind of hook serving it, e.g.
    /// `ok (fentry)`, so a kernel that fell back to a lesser hook shows.
    pub(super) fn cell(&self) -> String {
        match hook_kind(&self.hook) {
            Some(kind) => format!("{} ({kind})", self.status),
            None => self.status.clone(),
        }
    }
}

/// The kind of the hooks `netlens check` names for a feature (`fentry
/// tcp_conn_request + fexit tcp_v4_syn_recv_sock`): fentry (fexit too),
/// kprobe (kretprobe too), tp (tracepoints, raw or not) or tp_btf (BTF
/// tracepoints); kinds that differ are joined (`tp_btf+tp`), `None` when
/// none is named.
pub(super) fn hook_kind(hooks: &str) -> Option<String> {
    let kinds: Vec<&str> = hooks
        .split(" + ")
        .filter_map(|hook| match hook.split_whitespace().next()? {
            "fentry" | "fexit" => Some("fentry"),
            "kprobe" | "kretprobe" => Some("kprobe"),
            "tracepoint" | "raw" => Some("tp"),
            "tp_btf" => Some("tp_btf"),
            _ => None,
        })
        .fold(Vec::new(), |mut kinds, kind| {
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
            kinds
        });
    (!kinds.is_empty()).then(|| kinds.join("+"))
}

/// Reads `netlens check --json` (or, from a netlens without it, the plain
/// `CHECK  STATUS  DETAIL` table).
pub(super) fn parse_check(json: Option<&str>, plain: Option<&str>, exit_ok: bool, exit: String) -> CheckReport {
    let mut report = CheckReport { exit_ok, exit, features: Vec::new(), failed_checks: Vec::new(), json: false };
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    // The object may follow stray lines; take it from its first brace.
    let object = json
        .and_then(|j| j.find('{').map(|at| &j[at..]))
        .and_then(|j| serde_json::Deserializer::from_str(j).into_iter::<Value>().next()?.ok());
    if let Some(object) = object {
        report.json = true;
        for feature in object["features"].as_array().into_iter().flatten() {
            report.features.push(Feature {
                name: text(&feature["feature"]),
                status: text(&feature["status"]),
                hook: text(&feature["hook"]),
                why: text(&feature["why"]),
            });
        }
        for check in object["checks"].as_array().into_iter().flatten() {
            if check["ok"] != Value::Bool(true) {
                report.failed_checks.push((text(&check["check"]), text(&check["detail"])));
            }
        }
    } else if let Some(plain) = plain {
        report.failed_checks = failed_rows_of_table(plain);
    }
    report
}

/// Rows whose STATUS is not `ok` in check's plain table; columns are found
/// from the header, as names and details hold spaces.
fn failed_rows_of_table(table: &str) -> Vec<(String, String)> {
    let mut lines = table.lines().skip_while(|l| !(l.starts_with("CHECK") && l.contains("STATUS")));
    let Some(header) = lines.next() else { return Vec::new() };
    let (Some(status_at), Some(detail_at)) = (header.find("STATUS"), header.find("DETAIL")) else {
        return Vec::new();
    };
    lines
        .filter(|line| line.len() > status_at && line.is_char_boundary(status_at))
        .filter_map(|line| {
            let (name, rest) = line.split_at(status_at);
            // A row's status is `ok` or a capitalised word (FAIL); other
            // lines (the closing sentence) are not rows.
            let status = rest.split_whitespace().next()?;
            let failed = status != "ok" && status.chars().all(|c| c.is_ascii_uppercase());
            let detail = line.get(detail_at..).unwrap_or_default().trim();
            failed.then(|| (name.trim().to_string(), detail.to_string()))
        })
        .filter(|(name, _)| !name.is_empty())
        .collect()
}
