//! The POC report of a canary rollout (`idgraphctl canary report`), for the
//! people who decide whether a candidate rule set stays: a data or
//! marketing lead as much as an engineer.
//!
//! The report is built once from the rollout record as a list of blocks
//! (headings, sentences, tables, charts) holding raw text; the Markdown and
//! the HTML renderer then write the same sections in the same order, each
//! escaping the record's text its own way:
//!
//! 1. the decision: what happened to the candidate, in one sentence;
//! 2. the objective and the plan (steps, KPIs and their thresholds);
//! 3. the sample: canary against control traffic per step, and whether the
//!    judge found the canary shards representative;
//! 4. every KPI of the plan, canary against control, interval by interval
//!    (HTML adds an inline SVG chart per KPI);
//! 5. every judgement with its KPI outcomes;
//! 6. the rollout's history.
//!
//! The HTML is one self-contained page: inline style, inline SVG, no
//! script, no link, font or image to fetch, so it opens offline and can be
//! mailed or attached to a ticket as it is.

use idgraph_core::canary::{Direction, IntervalSample, Kpi, KpiCounts, KpiOutcome, Phase, Rollout, StepJudgement, StepSpec, Verdict};

/// The report as Markdown.
pub fn markdown(r: &Rollout) -> String {
    let mut out = String::new();
    for b in &blocks(r) {
        md_block(&mut out, b);
    }
    out
}

/// The report as one self-contained HTML page.
pub fn html(r: &Rollout) -> String {
    let mut out = String::from("<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    out.push_str(&format!("<title>{}</title>\n<style>\n{STYLE}</style>\n</head>\n<body>\n<main>\n", esc(&title(r))));
    for b in &blocks(r) {
        html_block(&mut out, b);
    }
    out.push_str("</main>\n</body>\n</html>\n");
    out
}

// ---------------------------------------------------------------------------
// The report's content, independent of the format.

/// How a highlighted sentence reads: good news, bad news, a decision still
/// open, or neither.
#[derive(Clone, Copy)]
enum Tone {
    Good,
    Bad,
    Open,
    Neutral,
}

impl Tone {
    fn class(self) -> &'static str {
        match self {
            Tone::Good => "good",
            Tone::Bad => "bad",
            Tone::Open => "open",
            Tone::Neutral => "neutral",
        }
    }
}

struct Table {
    head: Vec<String>,
    /// Right-aligned (numeric) columns.
    right: Vec<usize>,
    rows: Vec<Vec<String>>,
}

fn table(head: &[&str], right: &[usize]) -> Table {
    Table { head: head.iter().map(|h| h.to_string()).collect(), right: right.to_vec(), rows: Vec::new() }
}

/// One KPI, canary against control, over the rollout's intervals.
struct Chart {
    kpi: Kpi,
    /// Seconds since the start, canary value, control value.
    points: Vec<(f64, Option<f64>, Option<f64>)>,
    /// Where a later step begins: seconds since the start, step index.
    steps: Vec<(f64, usize)>,
    canary: String,
    control: String,
}

/// A piece of the report; its text is raw, each format escapes it.
enum Block {
    Heading(u8, String),
    Para(String),
    /// A sentence that stands out: a label in bold, then the text.
    Callout(Tone, String, String),
    Quote(String),
    Fields(Vec<(String, String)>),
    Table(Table),
    /// Drawn in HTML only.
    Chart(Chart),
    /// Folded away in HTML (a click opens it), shown as it is in Markdown.
    Folded(String, Vec<Block>),
}

fn title(r: &Rollout) -> String {
    format!("Canary POC report: {} against {}", r.plan.candidate, r.control)
}

fn blocks(r: &Rollout) -> Vec<Block> {
    let mut b = Vec::new();
    overview(r, &mut b);
    plan(r, &mut b);
    sample(r, &mut b);
    kpis(r, &mut b);
    verdicts(r, &mut b);
    history(r, &mut b);
    b
}

/// Events per shard of their anchor, as `shard: events` pairs.
fn per_shard(by_shard: &std::collections::BTreeMap<u32, u64>) -> String {
    if by_shard.is_empty() {
        return "–".into();
    }
    by_shard.iter().map(|(s, n)| format!("{s}: {n}")).collect::<Vec<_>>().join(", ")
}

/// Which step a judgement is of, in words.
fn judged_step(r: &Rollout, j: &idgraph_core::canary::StepJudgement) -> String {
    if j.shadow {
        "the shadow step (the candidate beside the cluster's version, writing nothing)".to_string()
    } else {
        format!("step {} of {}", j.step + 1, r.plan.steps.len())
    }
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

fn overview(r: &Rollout, b: &mut Vec<Block>) {
    b.push(Block::Heading(1, title(r)));
    let (tone, text) = decision(r);
    b.push(Block::Callout(tone, "Decision:".into(), text));
    if let Some(j) = r.judgements.last() {
        let text = format!("{} judged {} at {}: {}", judged_step(r, j), j.verdict, when(r, j.at_ms), grounds(j));
        b.push(Block::Callout(verdict_tone(j.verdict), "Latest judgement:".into(), text));
    }
    b.push(Block::Fields(vec![
        ("Rollout".into(), r.id.clone()),
        ("Candidate (canary)".into(), r.plan.candidate.clone()),
        ("Control".into(), r.control.clone()),
        ("Cluster".into(), plural(r.shard_count as u64, "shard", "shards")),
        ("Started".into(), format!("{} UTC", utc(r.started_ms))),
        ("Finished".into(), r.finished_ms.map(|ms| format!("{} UTC", utc(ms))).unwrap_or_else(|| "not yet".into())),
    ]));
}

/// The outcome in one sentence, and how it reads.
fn decision(r: &Rollout) -> (Tone, String) {
    let candidate = &r.plan.candidate;
    let why =
        r.history.iter().rev().find_map(|d| d.text.strip_prefix("rolling back: ")).map(|reason| format!(" ({reason})")).unwrap_or_default();
    let undone = format!(
        "{} made under {candidate} {} undone and {} could not be undone",
        plural(r.merges_undone, "merge", "merges"),
        if r.merges_undone == 1 { "was" } else { "were" },
        r.merges_skipped
    );
    let at_step = format!("step {} of {}", r.step + 1, r.plan.steps.len());
    match r.phase {
        Phase::Promoted => (Tone::Good, format!("promoted: {candidate} is now the cluster's version.")),
        Phase::RolledBack => (Tone::Bad, format!("rolled back{why}: every shard runs {} again; {undone}.", r.control)),
        Phase::RollingBack => (Tone::Bad, format!("still running: rolling back{why} at {at_step}; so far {undone}.")),
        ref phase => (
            Tone::Open,
            format!("still running: {}, {at_step}, {candidate} on {} of {} shards.", phase.name(), r.canary_count(), r.shard_count),
        ),
    }
}

fn plan(r: &Rollout, b: &mut Vec<Block>) {
    let p = &r.plan;
    b.push(Block::Heading(2, "Objective and plan".into()));
    b.push(Block::Quote(p.objective.clone()));
    let watch = if p.watch_secs > 0 {
        format!(" After the last step, a KPI breach still rolls back for {}.", duration(p.watch_secs))
    } else {
        String::new()
    };
    b.push(Block::Para(format!(
        "The candidate runs on a few shards first (a random sample of the customers, since shards are hash partitions of the \
         same traffic) and is compared with the control shards every {}. After each step's bake time, every KPI is checked \
         against its threshold and with a Mann-Whitney U test at significance level {}; a step passes with a score of at \
         least {:.0} out of 100, and from {:.0} it is marginal and waits for a person to decide.{watch}",
        duration(p.interval_secs),
        p.alpha,
        p.score.pass,
        p.score.marginal
    )));
    b.push(Block::Heading(3, "Steps".into()));
    let mut t = table(&["step", "canary shards", "bake", "min events", "manual gate"], &[0, 3]);
    for (i, s) in p.steps.iter().enumerate() {
        t.rows.push(vec![
            (i + 1).to_string(),
            format!("{} ({} of {})", step_size(s), p.shards_at(i, r.shard_count), r.shard_count),
            duration(s.bake_secs),
            s.min_events.to_string(),
            yes_no(s.manual).into(),
        ]);
    }
    b.push(Block::Table(t));
    b.push(Block::Heading(3, "KPIs".into()));
    let mut t = table(&["KPI", "meaning", "direction", "threshold", "floor", "critical"], &[3, 4]);
    for k in &p.kpis {
        t.rows.push(vec![
            k.name.name().into(),
            meaning(k.name).into(),
            direction(k.direction).into(),
            percent(k.threshold),
            value(k.name, Some(k.floor)),
            yes_no(k.critical).into(),
        ]);
    }
    b.push(Block::Table(t));
    b.push(Block::Para(
        "Threshold: how much worse than control the canary may be, relative to the control value; floor: a difference always \
         allowed, in the KPI's unit; a critical KPI that fails fails the step whatever the score."
            .into(),
    ));
}

fn step_size(s: &StepSpec) -> String {
    match (s.shards, s.percent) {
        (Some(n), _) => plural(n as u64, "shard", "shards"),
        (_, Some(p)) => format!("{p} %"),
        _ => "–".into(),
    }
}

fn sample(r: &Rollout, b: &mut Vec<Block>) {
    b.push(Block::Heading(2, "Sample and representativeness".into()));
    b.push(Block::Para(
        "Each event is resolved by the version of the shard that owns it, so canary and control see different customers of the \
         same traffic. The judge decides only when both groups' traffic looks alike: the same mix of identifier types and of \
         sources, and about as many events per shard."
            .into(),
    ));
    let mut any = false;
    for step in 0..r.plan.steps.len() {
        let here: Vec<&IntervalSample> = r.samples.iter().filter(|s| s.step == step && !s.shadow).collect();
        let (Some(first), Some(last)) = (here.first(), here.last()) else { continue };
        any = true;
        let (mut canary, mut control) = (KpiCounts::default(), KpiCounts::default());
        for s in &here {
            canary.add(&s.canary);
            control.add(&s.control);
        }
        let shards = here.iter().map(|s| s.shard_count).max().unwrap_or(0);
        let canary_shards = here.iter().map(|s| s.canary_shards).max().unwrap_or(0);
        b.push(Block::Heading(3, format!("Step {} of {}", step + 1, r.plan.steps.len())));
        b.push(Block::Para(format!(
            "{} from {} to {} ({} to {}).",
            plural(here.len() as u64, "interval", "intervals"),
            offset(r, first.at_ms),
            offset(r, last.at_ms),
            utc(first.at_ms),
            utc(last.at_ms)
        )));
        let mut t = table(&["", &format!("canary ({})", r.plan.candidate), &format!("control ({})", r.control)], &[]);
        t.rows.push(vec!["events".into(), canary.events.to_string(), control.events.to_string()]);
        t.rows.push(vec![
            "shards".into(),
            format!("{canary_shards} of {shards}"),
            format!("{} of {shards}", shards.saturating_sub(canary_shards)),
        ]);
        t.rows.push(vec!["identifier types".into(), mix(&canary.types), mix(&control.types)]);
        t.rows.push(vec!["sources".into(), mix(&canary.sources), mix(&control.sources)]);
        t.rows.push(vec!["events by shard".into(), per_shard(&canary.by_shard), per_shard(&control.by_shard)]);
        b.push(Block::Table(t));
        let Some(j) = r.judgements.iter().rev().find(|j| j.step == step && !j.shadow) else {
            b.push(Block::Para("Not judged yet.".into()));
            continue;
        };
        let m = &j.mix;
        let limits = &r.plan.mix;
        let ratio = match m.rate_ratio {
            Some(x) => format!("{x:.2}x (allowed 1/{0} to {0})", trim(limits.max_rate_ratio)),
            None if j.historical_control => "not compared (no control shards at this step)".into(),
            None => "–".into(),
        };
        let mut text = format!(
            "identifier-type distance {} (at most {:.2}), source distance {} (at most {:.2}), events per shard canary against \
             control {ratio}",
            distance(m.type_distance),
            limits.max_type_distance,
            distance(m.source_distance),
            limits.max_source_distance
        );
        if !m.reason.is_empty() {
            text.push_str(&format!("; {}", m.reason));
        }
        text.push_str(&format!(" (judgement at {}).", offset(r, j.at_ms)));
        let (tone, label) = if m.representative { (Tone::Good, "Representative: yes.") } else { (Tone::Bad, "Representative: no.") };
        b.push(Block::Callout(tone, label.into(), text));
        if j.historical_control {
            b.push(Block::Para(format!(
                "This step leaves no control shard: the judge compared the canary with the control intervals of the earlier \
                 steps ({} events).",
                j.control_events
            )));
        }
    }
    if !any {
        b.push(Block::Para("No interval sampled yet.".into()));
    }
}

fn kpis(r: &Rollout, b: &mut Vec<Block>) {
    b.push(Block::Heading(2, "KPIs: canary against control over time".into()));
    b.push(Block::Para(format!(
        "Per sampling interval, each KPI of the plan on the events {} resolved (canary) and on those {} resolved (control); \
         time counts from the start of the rollout. A dash: no event to measure in that interval.",
        r.plan.candidate, r.control
    )));
    let steps: Vec<(f64, usize)> =
        r.samples.windows(2).filter(|w| w[0].step != w[1].step).map(|w| (seconds(r, w[1].at_ms), w[1].step)).collect();
    let canary_head = format!("canary ({})", r.plan.candidate);
    let control_head = format!("control ({})", r.control);
    for k in &r.plan.kpis {
        b.push(Block::Heading(3, format!("{}: {} ({})", k.name.name(), meaning(k.name), direction(k.direction))));
        let points =
            r.samples.iter().map(|s| (seconds(r, s.at_ms), finite(s.canary.value(k.name)), finite(s.control.value(k.name)))).collect();
        b.push(Block::Chart(Chart {
            kpi: k.name,
            points,
            steps: steps.clone(),
            canary: canary_head.clone(),
            control: control_head.clone(),
        }));
        if r.samples.is_empty() {
            b.push(Block::Para("No interval sampled yet.".into()));
            continue;
        }
        let mut t = table(&["since start", "step", &canary_head, &control_head], &[0, 1, 2, 3]);
        for s in &r.samples {
            t.rows.push(vec![
                offset(r, s.at_ms),
                if s.shadow { "shadow".to_string() } else { (s.step + 1).to_string() },
                value(k.name, s.canary.value(k.name)),
                value(k.name, s.control.value(k.name)),
            ]);
        }
        b.push(Block::Folded(format!("{} values per interval", k.name.name()), vec![Block::Table(t)]));
    }
}

fn verdicts(r: &Rollout, b: &mut Vec<Block>) {
    b.push(Block::Heading(2, "Verdicts per step".into()));
    b.push(Block::Para(
        "pass: the rollout widens to the next step (or waits for a person at a manual gate); marginal: worse than allowed but \
         not significantly, a person promotes or aborts; fail: the rollout rolls back and undoes the candidate's merges; \
         inconclusive: too little data or unlike traffic, the step bakes again. A KPI's p-value is the chance of a difference \
         at least this large if the candidate changed nothing."
            .into(),
    ));
    if r.judgements.is_empty() {
        b.push(Block::Para("No step has been judged yet.".into()));
    }
    for j in &r.judgements {
        b.push(Block::Heading(3, format!("{}, judged at {} UTC ({})", capitalised(&judged_step(r, j)), utc(j.at_ms), offset(r, j.at_ms))));
        b.push(Block::Callout(verdict_tone(j.verdict), format!("Verdict: {}.", j.verdict), grounds(j)));
        b.push(Block::Para(verdict_evidence(j)));
        let mut t = table(&["KPI", "canary", "control", "p-value", "outcome", "critical"], &[1, 2, 3]);
        for k in &j.kpis {
            t.rows.push(vec![
                k.kpi.name().into(),
                value(k.kpi, k.canary),
                value(k.kpi, k.control),
                p_value(k.p_value),
                outcome(k.outcome).into(),
                yes_no(k.critical).into(),
            ]);
        }
        b.push(Block::Table(t));
    }
}

/// The judge's reason, with the score (out of 100) where it counted.
fn grounds(j: &StepJudgement) -> String {
    if j.verdict == Verdict::Inconclusive || j.reason.starts_with("score ") {
        format!("{}.", j.reason)
    } else {
        format!("score {:.0} of 100; {}.", j.score, j.reason)
    }
}

fn verdict_evidence(j: &StepJudgement) -> String {
    let control = if j.historical_control { " (control from earlier steps)" } else { "" };
    format!(
        "Evidence: {} canary and {} control events{control}, over {} of the step.",
        j.canary_events,
        j.control_events,
        plural(j.intervals as u64, "interval", "intervals")
    )
}

fn history(r: &Rollout, b: &mut Vec<Block>) {
    b.push(Block::Heading(2, "History".into()));
    let mut t = table(&["time (UTC)", "since start", "what happened"], &[1]);
    for d in &r.history {
        t.rows.push(vec![utc(d.at_ms), offset(r, d.at_ms), d.text.clone()]);
    }
    b.push(Block::Table(t));
}

// ---------------------------------------------------------------------------
// Words and numbers.

fn meaning(k: Kpi) -> &'static str {
    match k {
        Kpi::MergeRate => "merges per event",
        Kpi::ConflictRate => "identifiers refused by a type limit, per event",
        Kpi::NewProfileRate => "new profiles per event",
        Kpi::LargestProfile => "identifiers of the largest profile an event left",
        Kpi::IdentifiersPerProfile => "identifiers of an event's profile, on average",
        Kpi::ErrorRate => "failed identify calls per call",
        Kpi::IdentifyP99Ms => "99th percentile identify latency, ms",
    }
}

fn direction(d: Direction) -> &'static str {
    match d {
        Direction::LowerIsBetter => "lower is better",
        Direction::HigherIsBetter => "higher is better",
        Direction::Either => "any change is worse",
    }
}

fn outcome(o: KpiOutcome) -> &'static str {
    match o {
        KpiOutcome::Pass => "pass",
        KpiOutcome::Marginal => "marginal",
        KpiOutcome::Fail => "fail",
        KpiOutcome::NoData => "no data",
    }
}

fn verdict_tone(v: Verdict) -> Tone {
    match v {
        Verdict::Pass => Tone::Good,
        Verdict::Fail => Tone::Bad,
        Verdict::Marginal => Tone::Open,
        Verdict::Inconclusive => Tone::Neutral,
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn finite(v: Option<f64>) -> Option<f64> {
    v.filter(|v| v.is_finite())
}

/// A KPI value in its unit: rates with four decimals (four significant
/// digits below 0.001, so that a small error rate does not read as zero),
/// latency in ms with two decimals, profile sizes as counts.
fn value(k: Kpi, v: Option<f64>) -> String {
    let Some(v) = finite(v) else { return "–".into() };
    match k {
        Kpi::MergeRate | Kpi::ConflictRate | Kpi::NewProfileRate | Kpi::ErrorRate => rate(v),
        Kpi::IdentifyP99Ms | Kpi::IdentifiersPerProfile => format!("{v:.2}"),
        Kpi::LargestProfile => format!("{v:.0}"),
    }
}

fn rate(v: f64) -> String {
    if v == 0.0 || v.abs() >= 0.001 {
        format!("{v:.4}")
    } else {
        let decimals = (3 - v.abs().log10().floor() as i32).clamp(4, 15) as usize;
        format!("{v:.decimals$}")
    }
}

fn p_value(p: Option<f64>) -> String {
    match finite(p) {
        None => "–".into(),
        Some(p) if p < 0.0001 => "< 0.0001".into(),
        Some(p) => format!("{p:.4}"),
    }
}

fn distance(d: Option<f64>) -> String {
    d.map(|d| format!("{d:.2}")).unwrap_or_else(|| "–".into())
}

/// A number without trailing zeros (at most two decimals).
fn trim(x: f64) -> String {
    let s = format!("{x:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn percent(share: f64) -> String {
    format!("{} %", trim(share * 100.0))
}

/// The largest shares of a tally (identifier types, sources), in %.
fn mix(tally: &std::collections::BTreeMap<String, u64>) -> String {
    const SHOWN: usize = 5;
    let total: u64 = tally.values().sum();
    if total == 0 {
        return "–".into();
    }
    let mut entries: Vec<(&String, &u64)> = tally.iter().collect();
    entries.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let share = |n: u64| format!("{:.1} %", 100.0 * n as f64 / total as f64);
    let mut parts: Vec<String> = entries.iter().take(SHOWN).map(|(k, n)| format!("{k} {}", share(**n))).collect();
    if entries.len() > SHOWN {
        let rest: u64 = entries[SHOWN..].iter().map(|(_, n)| **n).sum();
        parts.push(format!("{} others {}", entries.len() - SHOWN, share(rest)));
    }
    parts.join(", ")
}

fn duration(secs: u64) -> String {
    match secs {
        s if s >= 86_400 && s % 86_400 == 0 => plural(s / 86_400, "day", "days"),
        s if s >= 3_600 && s % 3_600 == 0 => format!("{} h", s / 3_600),
        s if s >= 60 && s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

fn seconds(r: &Rollout, at_ms: i64) -> f64 {
    (at_ms - r.started_ms) as f64 / 1000.0
}

/// Time since the start of the rollout, `+12 s`.
fn offset(r: &Rollout, at_ms: i64) -> String {
    let ms = at_ms - r.started_ms;
    if ms % 1000 == 0 {
        format!("+{} s", ms / 1000)
    } else {
        format!("+{:.1} s", ms as f64 / 1000.0)
    }
}

fn when(r: &Rollout, at_ms: i64) -> String {
    format!("{} UTC ({})", utc(at_ms), offset(r, at_ms))
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS` (UTC).
fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, day_secs) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", day_secs / 3600, day_secs % 3600 / 60, day_secs % 60)
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

// ---------------------------------------------------------------------------
// Markdown.

fn md_cell(s: &str) -> String {
    s.replace('\\', "\\\\").replace('|', "\\|").replace(['\r', '\n'], " ")
}

fn md_block(out: &mut String, b: &Block) {
    match b {
        Block::Heading(level, text) => {
            out.push_str(&format!("{} {}\n\n", "#".repeat(*level as usize), text.replace(['\r', '\n'], " ")));
        }
        Block::Para(text) => out.push_str(&format!("{text}\n\n")),
        Block::Callout(_, label, text) => out.push_str(&format!("**{label}** {text}\n\n")),
        Block::Quote(text) => {
            for line in text.trim().lines() {
                out.push_str(&format!("> {line}\n"));
            }
            out.push('\n');
        }
        Block::Fields(fields) => {
            for (k, v) in fields {
                out.push_str(&format!("- **{k}:** {v}\n"));
            }
            out.push('\n');
        }
        Block::Table(t) => {
            let row = |cells: &[String]| format!("| {} |\n", cells.iter().map(|c| md_cell(c)).collect::<Vec<_>>().join(" | "));
            out.push_str(&row(&t.head));
            let rule: Vec<String> = (0..t.head.len()).map(|i| if t.right.contains(&i) { "---:" } else { "---" }.to_string()).collect();
            out.push_str(&format!("| {} |\n", rule.join(" | ")));
            for r in &t.rows {
                out.push_str(&row(r));
            }
            out.push('\n');
        }
        Block::Chart(_) => {}
        Block::Folded(_, inner) => {
            for b in inner {
                md_block(out, b);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// HTML.

const STYLE: &str = "\
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;color:#1f2933;background:#fff;margin:0}
main{max-width:62rem;margin:0 auto;padding:1.5rem 1rem 3rem}
h1{font-size:1.6rem;margin:.5rem 0 1rem}
h2{font-size:1.25rem;margin:2.2rem 0 .6rem;padding-bottom:.2rem;border-bottom:1px solid #d0d7de}
h3{font-size:1.05rem;margin:1.4rem 0 .4rem}
blockquote{margin:.5rem 0;padding:.6rem 1rem;border-left:4px solid #8a949e;background:#f6f8fa;font-size:1.05rem;white-space:pre-wrap}
.callout{margin:.6rem 0;padding:.55rem .8rem;border-left:4px solid #8a949e;background:#f6f8fa}
.callout.good{border-color:#1a7f37;background:#e9f7ee}
.callout.bad{border-color:#cf222e;background:#fdecee}
.callout.open{border-color:#bf8700;background:#fff8e1}
dl.fields{display:grid;grid-template-columns:max-content auto;gap:.15rem 1rem;margin:1rem 0}
dl.fields dt{font-weight:600}
dl.fields dd{margin:0}
table{border-collapse:collapse;margin:.4rem 0 1rem;font-size:.9rem}
th,td{border:1px solid #d0d7de;padding:.25rem .55rem;text-align:left;vertical-align:top}
th{background:#f3f5f7}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
details{margin:.2rem 0 1rem}
summary{cursor:pointer;color:#3d4852}
svg.chart{display:block;max-width:100%;height:auto;margin:.4rem 0}
@media print{main{max-width:none}}
";

/// Escapes text for HTML content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn html_block(out: &mut String, b: &Block) {
    match b {
        Block::Heading(level, text) => out.push_str(&format!("<h{level}>{}</h{level}>\n", esc(text))),
        Block::Para(text) => out.push_str(&format!("<p>{}</p>\n", esc(text))),
        Block::Callout(tone, label, text) => {
            out.push_str(&format!("<p class=\"callout {}\"><strong>{}</strong> {}</p>\n", tone.class(), esc(label), esc(text)));
        }
        Block::Quote(text) => out.push_str(&format!("<blockquote>{}</blockquote>\n", esc(text.trim()))),
        Block::Fields(fields) => {
            out.push_str("<dl class=\"fields\">\n");
            for (k, v) in fields {
                out.push_str(&format!("<dt>{}</dt><dd>{}</dd>\n", esc(k), esc(v)));
            }
            out.push_str("</dl>\n");
        }
        Block::Table(t) => {
            let class = |i: usize| if t.right.contains(&i) { " class=\"num\"" } else { "" };
            out.push_str("<table>\n<thead><tr>");
            for (i, h) in t.head.iter().enumerate() {
                out.push_str(&format!("<th{}>{}</th>", class(i), esc(h)));
            }
            out.push_str("</tr></thead>\n<tbody>\n");
            for row in &t.rows {
                out.push_str("<tr>");
                for (i, c) in row.iter().enumerate() {
                    out.push_str(&format!("<td{}>{}</td>", class(i), esc(c)));
                }
                out.push_str("</tr>\n");
            }
            out.push_str("</tbody>\n</table>\n");
        }
        Block::Chart(c) => out.push_str(&svg(c)),
        Block::Folded(summary, inner) => {
            out.push_str(&format!("<details>\n<summary>{}</summary>\n", esc(summary)));
            for b in inner {
                html_block(out, b);
            }
            out.push_str("</details>\n");
        }
    }
}

/// How a chart draws each thing, as presentation attributes (they hold
/// even where a mail client drops the page's style).
const AXIS: &str = "stroke=\"#57606a\" stroke-width=\"1\"";
const STEP: &str = "stroke=\"#8a949e\" stroke-width=\"1\" stroke-dasharray=\"3 3\"";
const CANARY_COLOR: &str = "#c2410c";
const CONTROL_COLOR: &str = "#1d4ed8";

fn series_line(class: &str) -> String {
    match class {
        "canary" => format!("stroke=\"{CANARY_COLOR}\" stroke-width=\"2\" fill=\"none\""),
        _ => format!("stroke=\"{CONTROL_COLOR}\" stroke-width=\"2\" fill=\"none\" stroke-dasharray=\"6 3\""),
    }
}

/// A line chart of one KPI, canary against control; drawn without script
/// and without the SVG namespace URL (inline SVG in HTML needs neither).
fn svg(c: &Chart) -> String {
    const W: f64 = 640.0;
    const H: f64 = 240.0;
    const LEFT: f64 = 72.0;
    const RIGHT: f64 = 16.0;
    const TOP: f64 = 30.0;
    const BOTTOM: f64 = 34.0;
    const MARKERS: usize = 120;
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let name = c.kpi.name();
    let mut s = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\" aria-label=\"{}\" \
         font-family=\"system-ui, sans-serif\" font-size=\"11\" fill=\"#3d4852\">\n<title>{}</title>\n",
        esc(&format!("{name}: {} against {} over time", c.canary, c.control)),
        esc(&format!("{name}, {} against {}", c.canary, c.control))
    );
    // Legend above the plot.
    let legend = [("canary", &c.canary, LEFT), ("control", &c.control, LEFT + pw / 2.0)];
    for (class, label, x) in legend {
        s.push_str(&format!(
            "<line class=\"{class}\" {} x1=\"{x}\" y1=\"14\" x2=\"{}\" y2=\"14\"/><text x=\"{}\" y=\"18\">{}</text>\n",
            series_line(class),
            x + 24.0,
            x + 30.0,
            esc(label)
        ));
    }
    s.push_str(&format!(
        "<line {AXIS} x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{0}\"/><line {AXIS} x1=\"{LEFT}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\"/>\n",
        TOP + ph,
        LEFT + pw
    ));
    let values: Vec<f64> = c.points.iter().flat_map(|(_, a, b)| [*a, *b]).flatten().collect();
    let times: Vec<f64> = c.points.iter().filter(|(_, a, b)| a.is_some() || b.is_some()).map(|(t, _, _)| *t).collect();
    if values.is_empty() || times.is_empty() {
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">no data yet</text>\n</svg>\n",
            LEFT + pw / 2.0,
            TOP + ph / 2.0
        ));
        return s;
    }
    let (vmin, vmax) = values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    let (tmin, tmax) = times.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), t| (lo.min(*t), hi.max(*t)));
    let x = |t: f64| if tmax > tmin { LEFT + (t - tmin) / (tmax - tmin) * pw } else { LEFT + pw / 2.0 };
    let y = |v: f64| if vmax > vmin { TOP + ph - (v - vmin) / (vmax - vmin) * ph } else { TOP + ph / 2.0 };
    // Axis labels: the values' range and the time range.
    s.push_str(&format!(
        "<text x=\"{0}\" y=\"{1}\" text-anchor=\"end\">{2}</text><text x=\"{0}\" y=\"{3}\" text-anchor=\"end\">{4}</text>\n",
        LEFT - 6.0,
        TOP + 4.0,
        esc(&value(c.kpi, Some(vmax))),
        TOP + ph,
        esc(&value(c.kpi, Some(vmin)))
    ));
    let t_label = |t: f64| if t.fract() == 0.0 { format!("+{t:.0} s") } else { format!("+{t:.1} s") };
    s.push_str(&format!(
        "<text x=\"{LEFT}\" y=\"{0}\">{1}</text><text x=\"{2}\" y=\"{0}\" text-anchor=\"middle\">time since start</text>\
         <text x=\"{3}\" y=\"{0}\" text-anchor=\"end\">{4}</text>\n",
        TOP + ph + 16.0,
        t_label(tmin),
        LEFT + pw / 2.0,
        LEFT + pw,
        t_label(tmax)
    ));
    // Where each later step begins.
    for (t, step) in c.steps.iter().filter(|(t, _)| (tmin..=tmax).contains(t)) {
        let sx = x(*t);
        s.push_str(&format!(
            "<line {STEP} x1=\"{sx:.1}\" y1=\"{TOP}\" x2=\"{sx:.1}\" y2=\"{0}\"/><text x=\"{1:.1}\" y=\"{2}\">step {3}</text>\n",
            TOP + ph,
            sx + 3.0,
            TOP + 11.0,
            step + 1
        ));
    }
    for (class, color) in [("canary", CANARY_COLOR), ("control", CONTROL_COLOR)] {
        let pts: Vec<(f64, f64)> = c
            .points
            .iter()
            .filter_map(|(t, canary, control)| {
                let v = if class == "canary" { canary } else { control };
                v.map(|v| (x(*t), y(v)))
            })
            .collect();
        let coords: Vec<String> = pts.iter().map(|(px, py)| format!("{px:.1},{py:.1}")).collect();
        s.push_str(&format!("<polyline class=\"{class}\" {} points=\"{}\"/>\n", series_line(class), coords.join(" ")));
        if pts.len() <= MARKERS {
            for (px, py) in pts {
                s.push_str(&format!("<circle fill=\"{color}\" cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"2.5\"/>"));
            }
            s.push('\n');
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use idgraph_core::canary::{judge, CanaryCommand};

    /// A valid plan whose objective holds markup, and three KPIs.
    const PLAN: &str = r#"
objective = "block the placeholder user id 'guest' <b>&"
candidate = "v2"
interval_secs = 1
steps = [
  { shards = 1, bake_secs = 5, min_events = 10 },
  { percent = 50, bake_secs = 5 },
  { percent = 100, bake_secs = 5 },
]
kpis = [
  { name = "merge_rate", direction = "lower_is_better", threshold = 0.5, floor = 0.02, critical = true },
  { name = "largest_profile", direction = "lower_is_better", threshold = 1.0, floor = 2 },
  { name = "identify_p99_ms", direction = "lower_is_better", threshold = 0.25 },
]
"#;

    const START_MS: i64 = 1_700_000_000_000;
    /// A source name a client could send: markup and a table separator.
    const ODD_SOURCE: &str = "<script>alert(1)</script>|app";

    fn counts(events: u64, merges: u64) -> KpiCounts {
        let mut c = KpiCounts { events, merges, largest: 3, identifiers: 2 * events, ..Default::default() };
        c.types.insert("email".into(), events);
        c.types.insert("cookie_id".into(), events);
        c.sources.insert("web".into(), events * 3 / 4);
        c.sources.insert(ODD_SOURCE.into(), events / 4);
        for _ in 0..events {
            c.observe_latency(300);
        }
        c
    }

    fn started(plan: &str) -> Rollout {
        let cmd = CanaryCommand::Start { id: "r-1".into(), plan_toml: plan.into(), control: "v1".into(), shard_count: 4, at_ms: START_MS };
        Rollout::start(&cmd, |_| true).unwrap()
    }

    /// Six intervals of step 1 with a candidate like control, judged.
    fn judged_rollout() -> Rollout {
        let mut r = started(PLAN);
        for i in 0..6u64 {
            let sample = IntervalSample {
                at_ms: START_MS + (i as i64 + 1) * 1000,
                step: 0,
                canary: counts(20, 1 + i % 2),
                control: counts(60, 3 + i % 3),
                canary_shards: 1,
                shard_count: 4,
                shadow: false,
            };
            r.apply(&CanaryCommand::Sample { id: r.id.clone(), sample }).unwrap();
        }
        let judgement = judge(&r.plan, 0, &r.samples, START_MS + 6_000);
        assert_eq!(judgement.verdict, Verdict::Pass, "{judgement:?}");
        r.apply(&CanaryCommand::Judged { id: r.id.clone(), judgement }).unwrap();
        r
    }

    #[test]
    fn markdown_has_the_objective_a_section_per_plan_kpi_and_the_verdict() {
        let r = judged_rollout();
        let md = markdown(&r);
        assert!(md.starts_with("# Canary POC report: v2 against v1\n"), "{md}");
        assert!(md.contains(&r.plan.objective), "{md}");
        for k in &r.plan.kpis {
            assert!(md.contains(&format!("\n### {}: ", k.name.name())), "no section for {}", k.name);
        }
        assert!(!md.contains("### error_rate"), "a KPI outside the plan has a section");
        assert!(md.contains("**Verdict: pass.**"), "{md}");
        assert!(md.contains("still running: baking, step 2 of 3"), "{md}");
        assert!(md.contains("2023-11-14 22:13:20"), "start time missing: {md}");
        // Sections in order.
        let at = |h: &str| md.find(h).unwrap_or_else(|| panic!("no {h}"));
        let order = [
            "## Objective and plan",
            "## Sample and representativeness",
            "## KPIs: canary against control",
            "## Verdicts per step",
            "## History",
        ];
        assert!(order.windows(2).all(|w| at(w[0]) < at(w[1])));
        // A record's `|` does not split a table cell.
        assert!(md.contains("<script>alert(1)</script>\\|app"), "{md}");
        assert!(md.contains("Representative: yes."), "{md}");
    }

    #[test]
    fn html_is_one_offline_page_with_a_chart_per_kpi_and_escaped_record_text() {
        let r = judged_rollout();
        let page = html(&r);
        assert!(page.starts_with("<!doctype html>"));
        assert_eq!(page.matches("<svg").count(), r.plan.kpis.len());
        assert_eq!(page.matches("<polyline").count(), 2 * r.plan.kpis.len());
        let lower = page.to_ascii_lowercase();
        assert!(!lower.contains("<script"), "a script or an unescaped source");
        assert!(!lower.contains("http://") && !lower.contains("https://"), "an external reference");
        assert!(page.contains("block the placeholder user id &#39;guest&#39; &lt;b&gt;&amp;"), "objective not escaped");
        assert!(!page.contains("<b>&"));
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;|app"));
        assert!(page.contains("Verdict: pass."));
    }

    #[test]
    fn a_rollout_without_samples_still_renders_every_section() {
        let r = started(PLAN);
        let page = html(&r);
        assert_eq!(page.matches("<svg").count(), r.plan.kpis.len());
        assert!(page.contains("no data yet"));
        let md = markdown(&r);
        assert!(md.contains("No step has been judged yet."));
        assert!(md.contains("started: v2 on 1 of 4 shards, control v1"), "history missing: {md}");
    }

    #[test]
    fn a_rolled_back_rollout_says_why_and_how_many_merges_were_undone() {
        let mut r = judged_rollout();
        let id = r.id.clone();
        r.apply(&CanaryCommand::Abort { id: id.clone(), reason: "support tickets".into(), at_ms: START_MS + 8_000 }).unwrap();
        r.apply(&CanaryCommand::Undone { id: id.clone(), merges: 3, skipped: 1 }).unwrap();
        r.apply(&CanaryCommand::Finish { id, at_ms: START_MS + 9_000 }).unwrap();
        let md = markdown(&r);
        assert!(
            md.contains(
                "**Decision:** rolled back (aborted: support tickets): every shard runs v1 again; 3 merges made under v2 were undone and \
                 1 could not be undone."
            ),
            "{md}"
        );
        assert!(md.contains("- **Finished:** 2023-11-14 22:13:29 UTC"), "{md}");
    }

    #[test]
    fn a_promoted_rollout_names_the_new_version() {
        let mut r = started(PLAN);
        for step in 0..3 {
            let judgement = StepJudgement { step, at_ms: START_MS + 5_000 * (step as i64 + 1), ..judged_rollout().judgements[0].clone() };
            r.apply(&CanaryCommand::Judged { id: r.id.clone(), judgement }).unwrap();
        }
        assert_eq!(r.phase, Phase::Promoted);
        assert!(markdown(&r).contains("**Decision:** promoted: v2 is now the cluster's version."));
    }

    #[test]
    fn times_are_utc_civil_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(-1), "1969-12-31 23:59:59");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(utc(START_MS + 999), "2023-11-14 22:13:20");
        assert_eq!(utc(4_107_542_400_000), "2100-03-01 00:00:00");
    }

    #[test]
    fn numbers_read_as_rates_p_values_and_milliseconds() {
        assert_eq!(value(Kpi::MergeRate, Some(0.0123456)), "0.0123");
        assert_eq!(value(Kpi::ErrorRate, Some(0.000012346)), "0.00001235");
        assert_eq!(value(Kpi::ErrorRate, Some(0.0)), "0.0000");
        assert_eq!(value(Kpi::IdentifyP99Ms, Some(4.0)), "4.00");
        assert_eq!(value(Kpi::LargestProfile, Some(12.0)), "12");
        assert_eq!(value(Kpi::MergeRate, None), "–");
        assert_eq!(p_value(Some(0.012345)), "0.0123");
        assert_eq!(p_value(Some(0.00001)), "< 0.0001");
        assert_eq!(percent(0.5), "50 %");
        assert_eq!(percent(0.125), "12.5 %");
    }
}
