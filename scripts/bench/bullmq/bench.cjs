// BullMQ's end-to-end rate on this machine's Redis, the baseline `sluice bench throughput` is
// held to: one `queue.add` per job, a Worker with concurrency 50 doing nothing, jobs/s printed.
// Run through scripts/bench-bullmq.sh, which installs bullmq and sets NODE_PATH.
'use strict';

const { Queue, Worker } = require('bullmq');
const IORedis = require('ioredis');

function usage(message) {
  if (message) console.error(`bench-bullmq: ${message}`);
  console.error(
    'usage: bench-bullmq.sh [--jobs N (20000)] [--adds-in-flight N (64)] [--concurrency N (50)]\n' +
      '                        [--redis URL (REDIS_URL or redis://127.0.0.1:6379)] [--worker-after-adds]\n' +
      '                        [--timeout-secs N (600)]',
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
    timeoutSecs: 600,
  };
  const numbers = {
    '--jobs': 'jobs',
    '--adds-in-flight': 'addsInFlight',
    '--concurrency': 'concurrency',
    '--timeout-secs': 'timeoutSecs',
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg in numbers) {
      const value = Number(argv[++i]);
      if (!Number.isInteger(value) || value < 1) usage(`${arg} needs a whole number of at least 1`);
      options[numbers[arg]] = value;
    } else if (arg === '--redis') {
      if (argv[i + 1] === undefined) usage('--redis needs a URL');
      options.redis = argv[++i];
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

function startWorker(name, connection, prefix, options, jobs, done) {
  let completed = 0;
  let failed = 0;
  const worker = new Worker(name, async () => ({ ok: true }), {
    connection,
    prefix,
    concurrency: options.concurrency,
  });
  worker.on('completed', () => {
    completed += 1;
    if (completed + failed === jobs) done({ completed, failed, at: process.hrtime.bigint() });
  });
  worker.on('failed', () => {
    failed += 1;
    if (completed + failed === jobs) done({ completed, failed, at: process.hrtime.bigint() });
  });
  worker.on('error', (error) => console.error('bench-bullmq: worker error:', error.message));
  return worker;
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

    console.error(
      `bench-bullmq: ${options.jobs} jobs, ${options.addsInFlight} adds in flight, worker concurrency ` +
        `${options.concurrency}${options.workerAfterAdds ? ' (worker starts after the adds)' : ''}, prefix ${prefix}`,
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
    console.log(`  adds in flight / worker   ${options.addsInFlight} / concurrency ${options.concurrency}`);
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

main().catch((error) => {
  console.error('bench-bullmq:', error);
  process.exit(1);
});
