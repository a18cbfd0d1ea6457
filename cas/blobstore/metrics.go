package blobstore

import (
	"context"
	"io"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/digest"
)

var (
	opSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "tvixfarm", Subsystem: "blobstore", Name: "operation_duration_seconds",
		Help:    "Duration of storage operations (Get until the reader is returned).",
		Buckets: prometheus.ExponentialBuckets(1e-5, 4, 12),
	}, []string{"store", "op", "code"})
	opBytes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "tvixfarm", Subsystem: "blobstore", Name: "bytes_total",
		Help: "Bytes of blobs requested by Get and offered to Put.",
	}, []string{"store", "op"})
	findMissing = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "tvixfarm", Subsystem: "blobstore", Name: "find_missing_digests_total",
		Help: "Digests asked about by FindMissing, by result.",
	}, []string{"store", "result"})
)

func init() {
	prometheus.MustRegister(opSeconds, opBytes, findMissing)
}

// NewMetricsBlobAccess returns base with Prometheus metrics for every
// operation, labelled with name (for example "cas" or "action_cache"), so
// operators can see latency, throughput and hit rates per store.
func NewMetricsBlobAccess(base BlobAccess, name string) BlobAccess {
	m := &metricsBlobAccess{BlobAccess: base, name: name, ok: map[string]prometheus.Observer{}}
	for _, op := range []string{"get", "put", "put_batch", "find_missing"} {
		m.ok[op] = opSeconds.WithLabelValues(name, op, "OK")
	}
	m.getBytes = opBytes.WithLabelValues(name, "get")
	m.putBytes = opBytes.WithLabelValues(name, "put")
	m.missing = findMissing.WithLabelValues(name, "missing")
	m.present = findMissing.WithLabelValues(name, "present")
	return m
}

type metricsBlobAccess struct {
	BlobAccess
	name string
	// Label lookups are done once: they cost more than the operations on
	// small blobs.
	ok                 map[string]prometheus.Observer
	getBytes, putBytes prometheus.Counter
	missing, present   prometheus.Counter
}

func (m *metricsBlobAccess) observe(op string, start time.Time, err error) {
	if err == nil {
		m.ok[op].Observe(time.Since(start).Seconds())
		return
	}
	opSeconds.WithLabelValues(m.name, op, status.Code(err).String()).Observe(time.Since(start).Seconds())
}

func (m *metricsBlobAccess) Get(ctx context.Context, d digest.Digest) (io.ReadCloser, error) {
	start := time.Now()
	rc, err := m.BlobAccess.Get(ctx, d)
	m.observe("get", start, err)
	if err == nil {
		m.getBytes.Add(float64(d.Size()))
	}
	return rc, err
}

func (m *metricsBlobAccess) Put(ctx context.Context, d digest.Digest, r io.Reader) error {
	start := time.Now()
	err := m.BlobAccess.Put(ctx, d, r)
	m.observe("put", start, err)
	m.putBytes.Add(float64(d.Size()))
	return err
}

func (m *metricsBlobAccess) FindMissing(ctx context.Context, ds []digest.Digest) ([]digest.Digest, error) {
	start := time.Now()
	missing, err := m.BlobAccess.FindMissing(ctx, ds)
	m.observe("find_missing", start, err)
	if err == nil {
		m.missing.Add(float64(len(missing)))
		m.present.Add(float64(len(ds) - len(missing)))
	}
	return missing, err
}

// PutBatch passes batches through to a base that takes them whole.
func (m *metricsBlobAccess) PutBatch(ctx context.Context, blobs []Blob) []error {
	start := time.Now()
	errs := PutBatch(ctx, m.BlobAccess, blobs)
	var size int64
	for i, b := range blobs {
		size += b.Digest.Size()
		if errs[i] != nil {
			opSeconds.WithLabelValues(m.name, "put", status.Code(errs[i]).String()).Observe(0)
		}
	}
	m.ok["put_batch"].Observe(time.Since(start).Seconds())
	m.putBytes.Add(float64(size))
	return errs
}

// Stats passes the base's stats through.
func (m *metricsBlobAccess) Stats() Stats { return StatsOf(m.BlobAccess) }
