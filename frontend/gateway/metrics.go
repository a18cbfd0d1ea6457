package gateway

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// phaseSeconds is where a forwarded action's time goes: queue (waiting
// for the concurrency limit), upload (the inputs the remote lacks),
// execute (the remote's Execute and WaitExecution streams: its queue and
// its run) and fetch (copying the result back and storing it). upload +
// fetch is the gateway hop's own cost.
var phaseSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{
	Namespace: "tvixfarm", Subsystem: "gateway", Name: "phase_duration_seconds",
	Help:    "Time of each phase of an action forwarded to the remote execution backend.",
	Buckets: prometheus.ExponentialBuckets(1e-4, 4, 12),
}, []string{"phase"})

func init() { prometheus.MustRegister(phaseSeconds) }

// observe records the time since *t0 for phase and restarts the clock.
func observe(phase string, t0 *time.Time) {
	now := time.Now()
	phaseSeconds.WithLabelValues(phase).Observe(now.Sub(*t0).Seconds())
	*t0 = now
}
