//! Scheduler tests: the schedule's choices one by one, and simulations of a full host with many
//! tenants, checked for quotas, label matches, starvation and weighted shares.

use super::*;

fn demand(key: &str, tenant: &str, labels: &[&str]) -> Demand {
    Demand {
        key: key.into(),
        tenant: tenant.into(),
        labels: labels.iter().map(|l| l.to_string()).collect(),
    }
}

fn share(weight: u32, max_concurrent_jobs: u32) -> Share {
    Share { weight, max_concurrent_jobs }
}

#[test]
fn labels_fit_without_regard_to_case_and_with_self_hosted_implied() {
    let pool = vec!["Windows".to_string(), "ARM64".to_string()];
    let fit = |labels: &[&str]| {
        labels_fit(&labels.iter().map(|l| l.to_string()).collect::<Vec<_>>(), &pool)
    };
    assert!(fit(&["self-hosted", "windows", "arm64"]));
    assert!(fit(&["SELF-HOSTED", "WINDOWS"]));
    assert!(fit(&[]));
    assert!(!fit(&["windows", "x64"]));
    assert!(!fit(&["linux"]));
}

#[test]
fn a_tenant_with_nothing_running_goes_first() {
    let mut schedule = Schedule::default();
    schedule.set_share("big", share(10, 0));
    for i in 0..5 {
        assert!(schedule.push(demand(&format!("big-{i}"), "big", &[])));
    }
    assert_eq!(schedule.next(|_| true).unwrap().key, "big-0");
    assert_eq!(schedule.next(|_| true).unwrap().key, "big-1");
    assert!(schedule.push(demand("small-0", "small", &[])));
    assert_eq!(schedule.next(|_| true).unwrap().key, "small-0", "a share of zero wins");
}

#[test]
fn the_same_key_waits_once_and_withdrawn_demand_is_not_picked() {
    let mut schedule = Schedule::default();
    assert!(schedule.push(demand("a", "t", &[])));
    assert!(!schedule.push(demand("a", "t", &[])));
    assert!(schedule.push(demand("b", "t", &[])));
    assert_eq!(schedule.withdraw("a").unwrap().key, "a");
    assert!(schedule.withdraw("a").is_none());
    assert_eq!(schedule.next(|_| true).unwrap().key, "b");
    assert!(schedule.next(|_| true).is_none());
}

#[test]
fn a_tenant_at_its_quota_waits_until_a_job_ends() {
    let mut schedule = Schedule::default();
    schedule.set_share("t", share(1, 1));
    schedule.push(demand("a", "t", &[]));
    schedule.push(demand("b", "t", &[]));
    assert_eq!(schedule.next(|_| true).unwrap().key, "a");
    assert!(schedule.next(|_| true).is_none());
    schedule.finished("t");
    assert_eq!(schedule.next(|_| true).unwrap().key, "b");
}

#[test]
fn demand_that_fits_no_pool_does_not_block_its_tenants_other_demand() {
    let mut schedule = Schedule::default();
    schedule.push(demand("gpu", "t", &["gpu"]));
    schedule.push(demand("plain", "t", &["linux"]));
    let fits = |d: &Demand| labels_fit(&d.labels, &["linux".to_string()]);
    assert_eq!(schedule.next(fits).unwrap().key, "plain");
    assert!(schedule.next(fits).is_none());
    assert_eq!(schedule.waiting("t"), 1);
}

#[test]
fn demand_put_back_is_picked_again_first() {
    let mut schedule = Schedule::default();
    schedule.push(demand("a", "t", &[]));
    schedule.push(demand("b", "t", &[]));
    let a = schedule.next(|_| true).unwrap();
    assert_eq!(schedule.running("t"), 1);
    schedule.put_back(a);
    assert_eq!(schedule.running("t"), 0);
    assert_eq!(schedule.next(|_| true).unwrap().key, "a");
}

/// xorshift64*: a small, seeded generator, so that every simulation can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Tenant {
    name: String,
    share: Share,
    labels: Vec<&'static str>,
}

struct Outcome {
    /// Slot ticks used by each tenant.
    used: BTreeMap<String, u64>,
    /// The longest any demand waited, in ticks, by tenant.
    longest_wait: BTreeMap<String, u64>,
}

/// Runs `ticks` steps of a host with `slots` slots, two pools (`linux` and `windows`), and
/// `tenants` that always have demand (backlogged). Jobs last 1 to `max_len` ticks. Checks on
/// every step that no tenant exceeds its quota and that jobs run only on pools that carry
/// their labels.
fn simulate(seed: u64, slots: usize, tenants: &[Tenant], ticks: u64, max_len: u64) -> Outcome {
    let pools = [vec!["linux".to_string()], vec!["windows".to_string(), "arm64".to_string()]];
    let mut rng = Rng(seed);
    let mut schedule = Schedule::default();
    let mut queued_at: HashMap<String, u64> = HashMap::new();
    let mut outcome = Outcome { used: BTreeMap::new(), longest_wait: BTreeMap::new() };
    // (pool, tenant, ends at)
    let mut running: Vec<(usize, String, u64)> = Vec::new();
    let mut next_key = 0;
    for tenant in tenants {
        schedule.set_share(&tenant.name, tenant.share);
    }

    for tick in 0..ticks {
        for tenant in tenants {
            while schedule.waiting(&tenant.name) < 3 {
                next_key += 1;
                let key = format!("{}-{next_key}", tenant.name);
                let label = tenant.labels[rng.below(tenant.labels.len() as u64) as usize];
                queued_at.insert(key.clone(), tick);
                schedule.push(demand(&key, &tenant.name, &[label]));
            }
        }
        running.retain(|(_, tenant, ends)| {
            let done = *ends <= tick;
            if done {
                schedule.finished(tenant);
            }
            !done
        });

        // Half the slots serve each pool.
        let free = |running: &Vec<(usize, String, u64)>, pool: usize| {
            slots / 2 - running.iter().filter(|(p, _, _)| *p == pool).count()
        };
        loop {
            let room = [free(&running, 0) > 0, free(&running, 1) > 0];
            let fits = |d: &Demand| (0..2).any(|p| room[p] && labels_fit(&d.labels, &pools[p]));
            let Some(picked) = schedule.next(fits) else { break };
            let pool = (0..2).find(|&p| room[p] && labels_fit(&picked.labels, &pools[p])).unwrap();
            let waited = tick - queued_at[&picked.key];
            let longest = outcome.longest_wait.entry(picked.tenant.clone()).or_default();
            *longest = (*longest).max(waited);
            running.push((pool, picked.tenant.clone(), tick + 1 + rng.below(max_len)));
        }

        for tenant in tenants {
            let count = running.iter().filter(|(_, t, _)| *t == tenant.name).count() as u32;
            let quota = tenant.share.max_concurrent_jobs;
            assert!(quota == 0 || count <= quota, "seed {seed}: {} over quota", tenant.name);
            assert_eq!(count, schedule.running(&tenant.name), "seed {seed}");
            *outcome.used.entry(tenant.name.clone()).or_default() += u64::from(count);
        }
        assert!(running.iter().all(|(pool, _, _)| free(&running, *pool) < slots));
    }
    outcome
}

#[test]
fn on_a_full_host_shares_follow_the_weights() {
    for seed in 1..=20 {
        let tenants = [
            Tenant { name: "a".into(), share: share(1, 0), labels: vec!["linux"] },
            Tenant { name: "b".into(), share: share(2, 0), labels: vec!["linux"] },
            Tenant { name: "c".into(), share: share(5, 0), labels: vec!["linux"] },
        ];
        let outcome = simulate(seed, 32, &tenants, 5_000, 20);
        let total: u64 = outcome.used.values().sum();
        for tenant in &tenants {
            let expected = f64::from(tenant.share.weight) / 8.0;
            let got = outcome.used[&tenant.name] as f64 / total as f64;
            assert!(
                (got - expected).abs() < 0.03,
                "seed {seed}: tenant {} used {got:.3} of the host, its weight says {expected:.3}",
                tenant.name
            );
        }
    }
}

#[test]
fn no_tenant_starves_whatever_the_weights_and_labels() {
    for seed in 1..=50 {
        let mut rng = Rng(seed * 7919);
        let tenants: Vec<Tenant> = (0..6)
            .map(|i| Tenant {
                name: format!("t{i}"),
                share: share(1 + rng.below(100) as u32, rng.below(4) as u32),
                labels: match i % 3 {
                    0 => vec!["linux"],
                    1 => vec!["windows"],
                    _ => vec!["linux", "arm64"],
                },
            })
            .collect();
        let max_len = 10;
        let outcome = simulate(seed, 8, &tenants, 3_000, max_len);
        for tenant in &tenants {
            let waited = outcome.longest_wait.get(&tenant.name).copied();
            // A tenant with nothing running is first in line at the next free slot that
            // fits, and some slot frees within a job's length; it then waits at most one
            // job length per tenant ahead of it in the same situation.
            let bound = max_len * tenants.len() as u64;
            assert!(
                waited.is_some_and(|waited| waited <= bound * 3),
                "seed {seed}: tenant {} (weight {}) waited {waited:?} ticks at worst",
                tenant.name,
                tenant.share.weight
            );
        }
    }
}

#[test]
fn quotas_cap_a_tenant_even_on_an_idle_host() {
    let tenants = [
        Tenant { name: "capped".into(), share: share(100, 2), labels: vec!["linux"] },
        Tenant { name: "other".into(), share: share(1, 0), labels: vec!["windows"] },
    ];
    let outcome = simulate(3, 16, &tenants, 1_000, 5);
    assert!(outcome.used["capped"] <= 2 * 1_000);
}
