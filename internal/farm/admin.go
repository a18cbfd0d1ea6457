package farm

import (
	"context"
	"sort"
	"time"

	"tvixfarm/cas/blobstore"
	adminpb "tvixfarm/proto/tvixfarm/admin/v1"
)

// Version is the version of the binary, set by the linker.
var Version = "dev"

// adminServer implements the Admin service that `farmctl status` reads.
type adminServer struct {
	adminpb.UnimplementedAdminServer
	f       *Farm
	started time.Time
}

func (a *adminServer) Status(ctx context.Context, req *adminpb.StatusRequest) (*adminpb.StatusResponse, error) {
	resp := &adminpb.StatusResponse{
		Version:     Version,
		Roles:       a.f.roles(),
		StartedUnix: a.started.Unix(),
		DataDir:     a.f.cfg.Data,
	}
	add := func(instance string, st blobstore.Stores) {
		for _, s := range []struct {
			kind string
			ba   blobstore.BlobAccess
		}{{"cas", st.CAS}, {"action_cache", st.AC}} {
			x := blobstore.StatsOf(s.ba)
			resp.Stores = append(resp.Stores, &adminpb.StoreStatus{
				Instance: instance, Kind: s.kind, Backend: x.Backend,
				Blobs: x.Blobs, Bytes: x.Bytes, MaxBytes: x.MaxBytes,
			})
		}
	}
	if e := a.f.exec; e != nil {
		es := &adminpb.ExecutorStatus{Name: e.Name(), Slots: int32(e.Slots()), Running: int32(e.Running())}
		for _, p := range e.Platform().Properties {
			es.Platform = append(es.Platform, p.Name+"="+p.Value)
		}
		resp.Executor = es
	}
	if g := a.f.gw; g != nil {
		s := g.Status(ctx)
		resp.Execution = &adminpb.ExecutionBackendStatus{
			Backend: "remote", Address: s.Address, InstanceName: s.Instance, DigestFunction: s.DigestFunction,
			ApiVersion: s.APIVersion, Healthy: s.Healthy, Error: s.Error, Concurrency: int32(s.Concurrency),
			Queued: int32(s.Queued), Executing: int32(s.Executing), Forwarded: s.Forwarded, Failed: s.Failed,
		}
	}
	if a.f.stores == nil {
		return resp, nil
	}
	add("", a.f.stores.Default)
	names := make([]string, 0, len(a.f.stores.ByName))
	for n := range a.f.stores.ByName {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		add(n, a.f.stores.ByName[n])
	}
	return resp, nil
}

// roles lists the roles this process runs.
func (f *Farm) roles() []string {
	var rs []string
	if f.stores != nil {
		rs = append(rs, "storage")
	}
	if f.sched != nil {
		rs = append(rs, "scheduler")
	}
	if f.runner != nil {
		rs = append(rs, "executor")
	}
	if f.gw != nil {
		rs = append(rs, "gateway")
	}
	return rs
}
