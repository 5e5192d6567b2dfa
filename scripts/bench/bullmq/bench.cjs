// BullMQ's end-to-end rate on this machine's Redis, the baseline `sluice bench throughput` is
// held to: one `queue.add` per job, a Worker with concurrency 50 doing nothing (or, with
// --provider, making the job's chat completion call as Sluice's worker does), jobs/s printed.
// Run through scripts/bench-bullmq.sh, which installs bullmq and sets NODE_PATH.
'use strict';

const { fork } = require('node:child_process');
const { Queue, Worker } = require('bullmq');
const IORedis = require('ioredis');

function usage(message) {
  if (message) console.error(`bench-bullmq: ${message}`);
  console.error(
    'usage: bench-bullmq.sh [--jobs N (20000)] [--adds-in-flight N (64)] [--concurrency N (50)]\n' +
      '                        [--redis URL (REDIS_URL or redis://127.0.0.1:6379)] [--worker-after-adds]\n' +
      '                        [--timeout-secs N (600)] [--provider URL [--provider-key KEY (sk-sim-bench)]\n' +
      '                        [--model NAME (sim-model)]] [--worker-processes N (0)]',
  );
  process.exit(2);
}

function parseArgs(argv) {
  const options = {
    jobs: 20000,
    addsInFlight: 64,
    concurrency: 50,
    redis: process.env.REDIS_URL || 'redis://127.0.0.1:6379',
    workerAfterAdds: false,
    workerProcesses: 0,
    timeoutSecs: 600,
    provider: null,
    providerKey: 'sk-sim-bench',
    model: 'sim-model',
  };
  const numbers = {
    '--jobs': 'jobs',
    '--adds-in-flight': 'addsInFlight',
    '--concurrency': 'concurrency',
    '--timeout-secs': 'timeoutSecs',
    '--worker-processes': 'workerProcesses',
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg in numbers) {
      const value = Number(argv[++i]);
      const least = arg === '--worker-processes' ? 0 : 1;
      if (!Number.isInteger(value) || value < least) usage(`${arg} needs a whole number of at least ${least}`);
      options[numbers[arg]] = value;
    } else if (arg === '--redis') {
      if (argv[i + 1] === undefined) usage('--redis needs a URL');
      options.redis = argv[++i];
    } else if (arg === '--provider' || arg === '--provider-key' || arg === '--model') {
      const value = argv[++i];
      if (value === undefined || value === '') usage(`${arg} needs a value`);
      if (arg === '--provider') {
        let url;
        try {
          url = new URL(value);
        } catch {
          usage(`--provider needs an http(s) URL such as http://127.0.0.1:9000/v1, not '${value}'`);
        }
        if (url.protocol !== 'http:' && url.protocol !== 'https:') usage('--provider needs an http(s) URL');
        options.provider = value.replace(/\/+$/, '');
      } else {
        options[arg === '--model' ? 'model' : 'providerKey'] = value;
      }
    } else if (arg === '--worker-after-adds') {
      options.workerAfterAdds = true;
    } else if (arg === '-h' || arg === '--help') {
      usage();
    } else {
      usage(`unknown argument ${arg}`);
    }
  }
  return options;
}

// Every key this run makes starts with the prefix, deleted at the end whatever happened.
async function deleteKeys(redis, prefix) {
  let cursor = '0';
  let deleted = 0;
  do {
    const [next, keys] = await redis.scan(cursor, 'MATCH', `${prefix}:*`, 'COUNT', 1000);
    cursor = next;
    if (keys.length > 0) deleted += await redis.del(...keys);
  } while (cursor !== '0');
  return deleted;
}

// With --provider each job is what a Sluice job is: one OpenAI chat completion call whose answer
// becomes the job's result (BullMQ keeps a processor's return value in Redis). A failed call
// fails the job, so a run against a provider that refuses cannot pass for a fast one.
function processorFor(options) {
  if (!options.provider) return async () => ({ ok: true });
  const url = `${options.provider}/chat/completions`;
  return async (job) => {
    const response = await fetch(url, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${options.providerKey}` },
      body: JSON.stringify({ model: options.model, messages: job.data.messages }),
    });
    const body = await response.text();
    if (!response.ok) throw new Error(`provider answered ${response.status}: ${body.slice(0, 200)}`);
    return JSON.parse(body);
  };
}

// `each` is told of every finished job ('completed' or 'failed'); `done` once `jobs` have.
function startLocalWorker(name, connection, prefix, options, jobs, each, done) {
  let completed = 0;
  let failed = 0;
  const worker = new Worker(name, processorFor(options), {
    connection,
    prefix,
    concurrency: options.concurrency,
  });
  const finish = (kind) => {
    if (kind === 'completed') completed += 1;
    else failed += 1;
    each(kind);
    if (completed + failed === jobs) done({ completed, failed, at: process.hrtime.bigint() });
  };
  worker.on('completed', () => finish('completed'));
  worker.on('failed', (_job, error) => {
    if (failed === 0) console.error('bench-bullmq: first failed job:', error.message);
    finish('failed');
  });
  worker.on('error', (error) => console.error('bench-bullmq: worker error:', error.message));
  return worker;
}

// Node runs a process's JavaScript on one core. --worker-processes N puts the Worker in N child
// processes instead (concurrency each), as a deployment runs producers and workers apart, so
// BullMQ can use both cores as Sluice's bench does. Each child reports what it finished every
// 10 ms; the parent adds them up and takes the time when the last one arrives.
const REPORT_EVERY_MS = 10;

function startWorker(name, connection, prefix, options, jobs, done) {
  if (options.workerProcesses === 0) return startLocalWorker(name, connection, prefix, options, jobs, () => {}, done);
  const totals = { completed: 0, failed: 0 };
  let closing = false;
  let finished = false;
  const children = Array.from({ length: options.workerProcesses }, () => {
    const child = fork(__filename, [], {
      env: { ...process.env, BENCH_BULLMQ_WORKER: JSON.stringify({ name, connection, prefix, options }) },
    });
    const ready = new Promise((resolve, reject) => {
      child.on('message', (message) => message.ready && resolve());
      child.once('exit', (code) => reject(new Error(`a worker process exited (${code}) before it was ready`)));
    });
    // Only awaited without --worker-after-adds; the exit handler below reports a death either way.
    ready.catch(() => {});
    child.on('message', (message) => {
      if (!message.finished || finished) return;
      totals.completed += message.finished.completed;
      totals.failed += message.finished.failed;
      if (totals.completed + totals.failed >= jobs) {
        finished = true;
        done({ ...totals, at: process.hrtime.bigint() });
      }
    });
    // A worker process that dies mid-run fails the run now rather than at --timeout-secs.
    child.on('exit', (code, signal) => {
      if (closing || finished) return;
      finished = true;
      console.error(`bench-bullmq: a worker process exited (${signal || code}) before every job finished`);
      done({ completed: totals.completed, failed: jobs - totals.completed, at: process.hrtime.bigint() });
    });
    return { child, ready };
  });
  return {
    waitUntilReady: () => Promise.all(children.map((c) => c.ready)),
    close: () => {
      closing = true;
      return Promise.all(
        children.map(
          ({ child }) =>
            new Promise((resolve) => {
              if (child.exitCode !== null || child.signalCode !== null) return resolve();
              child.once('exit', resolve);
              child.send({ close: true });
            }),
        ),
      );
    },
  };
}

// A worker process (--worker-processes): run one Worker and report to the parent until told to close.
function runWorkerProcess() {
  const { name, connection, prefix, options } = JSON.parse(process.env.BENCH_BULLMQ_WORKER);
  const unsent = { completed: 0, failed: 0 };
  const worker = startLocalWorker(name, connection, prefix, options, Infinity, (kind) => {
    unsent[kind] += 1;
  });
  const timer = setInterval(() => {
    if (unsent.completed + unsent.failed === 0) return;
    process.send({ finished: { ...unsent } });
    unsent.completed = 0;
    unsent.failed = 0;
  }, REPORT_EVERY_MS);
  worker.waitUntilReady().then(() => process.send({ ready: true }));
  // The parent is gone (killed, or crashed): nobody will count these jobs or close this worker.
  process.on('disconnect', () => process.exit(1));
  process.on('message', async (message) => {
    if (message.close) {
      clearInterval(timer);
      await worker.close();
      process.exit(0);
    }
  });
}

async function main() {
  const options = parseArgs(process.argv.slice(2));
  const prefix = `sluice-bench-bullmq-${process.pid}-${Date.now()}`;
  const name = 'bench';
  const connection = { url: options.redis };
  // Only for deleting the run's keys afterwards.
  const admin = new IORedis(options.redis, { maxRetriesPerRequest: 3 });
  const queue = new Queue(name, { connection, prefix });
  let worker;
  try {
    await queue.waitUntilReady();
    let finish;
    const finished = new Promise((resolve) => {
      finish = resolve;
    });
    if (!options.workerAfterAdds) {
      worker = startWorker(name, connection, prefix, options, options.jobs, finish);
      await worker.waitUntilReady();
    }

    const workers = `concurrency ${options.concurrency}${
      options.workerProcesses ? ` each, in ${options.workerProcesses} worker process(es)` : ''
    }`;
    console.error(
      `bench-bullmq: ${options.jobs} jobs, ${options.addsInFlight} adds in flight, worker ${workers}` +
        `${options.workerAfterAdds ? ' (worker starts after the adds)' : ''}, prefix ${prefix}`,
    );
    const started = process.hrtime.bigint();
    let next = 0;
    // As Sluice's bench has 64 HTTP clients: each adds one job at a time until none is left.
    const adders = Array.from({ length: Math.min(options.addsInFlight, options.jobs) }, async () => {
      while (next < options.jobs) {
        const n = next++;
        await queue.add('job', { n, messages: [{ role: 'user', content: `bench job ${n}` }] });
      }
    });
    await Promise.all(adders);
    const added = process.hrtime.bigint();
    if (options.workerAfterAdds) {
      worker = startWorker(name, connection, prefix, options, options.jobs, finish);
    }
    // A worker that cannot reach Redis would otherwise leave the run waiting for ever.
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`not every job finished within ${options.timeoutSecs} s`)),
        options.timeoutSecs * 1000,
      );
    });
    const result = await Promise.race([finished, timeout]);
    clearTimeout(timer);

    const seconds = (from, to) => Number(to - from) / 1e9;
    const addSecs = seconds(started, added);
    const wallSecs = seconds(started, result.at);
    console.log(`bullmq ${require('bullmq/package.json').version} on ${options.redis.replace(/\/\/[^@/]*@/, '//')}`);
    console.log(`  jobs                      ${options.jobs} (${result.failed} failed)`);
    console.log(`  adds in flight / worker   ${options.addsInFlight} / ${workers}`);
    console.log(`  processor                 ${options.provider ? `POST ${options.provider}/chat/completions` : 'does nothing'}`);
    console.log(`  add phase                 ${addSecs.toFixed(2)} s (${(options.jobs / addSecs).toFixed(0)} adds/s)`);
    if (options.workerAfterAdds) {
      const drainSecs = seconds(added, result.at);
      console.log(`  drain after the adds      ${drainSecs.toFixed(2)} s (${(options.jobs / drainSecs).toFixed(0)} jobs/s)`);
    }
    console.log(`  end to end                ${wallSecs.toFixed(2)} s (${(options.jobs / wallSecs).toFixed(0)} jobs/s)`);
    if (result.failed > 0) process.exitCode = 1;
  } finally {
    if (worker) await worker.close();
    await queue.close();
    try {
      const deleted = await deleteKeys(admin, prefix);
      console.error(`bench-bullmq: deleted ${deleted} keys under ${prefix}`);
    } finally {
      admin.disconnect();
    }
  }
}

if (process.env.BENCH_BULLMQ_WORKER) {
  runWorkerProcess();
} else {
  main().catch((error) => {
    console.error('bench-bullmq:', error);
    process.exit(1);
  });
}
