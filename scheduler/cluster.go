package scheduler

import (
	"context"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	adminpb "tvixfarm/proto/tvixfarm/admin/v1"
	schedulerpb "tvixfarm/proto/tvixfarm/scheduler/v1"
	"tvixfarm/scheduler/state"
)

// Cluster serves the cluster administration that farmctl uses. Its calls
// are forwarded to the leader.
type Cluster struct {
	adminpb.UnimplementedClusterServer
	n  *Node
	ws *Workers
}

// NewCluster returns the administration service of node n.
func NewCluster(n *Node, ws *Workers) *Cluster { return &Cluster{n: n, ws: ws} }

// Status describes the cluster.
func (c *Cluster) Status(ctx context.Context, req *adminpb.ClusterStatusRequest) (*adminpb.ClusterStatus, error) {
	st := c.n.Stats()
	resp := &adminpb.ClusterStatus{Leader: st.Leader, Term: st.Term, LastIndex: st.LastIndex}
	for _, m := range st.Members {
		resp.Members = append(resp.Members, &adminpb.ClusterMember{Id: m.ID, Raft: m.Raft, Client: m.Client, Voter: m.Voter, Leader: m.ID == st.Leader})
	}
	c.n.Read(func(s *state.State) {
		for _, q := range s.QueueLengths() {
			resp.Queue = append(resp.Queue, &adminpb.QueueLength{Priority: q.Priority, Queued: int64(q.Queued)})
		}
		for _, w := range s.Workers() {
			wi := &adminpb.WorkerInfo{Id: w.Id, Slots: w.Slots, Running: int32(len(w.Running)), Drained: w.Drained}
			for _, p := range w.Platform {
				wi.Platform = append(wi.Platform, p.Name+"="+p.Value)
			}
			resp.Workers = append(resp.Workers, wi)
		}
		resp.Executing = int64(len(s.Operations(schedulerpb.Stage_STAGE_EXECUTING)))
		resp.Completed = int64(len(s.Operations(schedulerpb.Stage_STAGE_COMPLETED)))
	})
	return resp, nil
}

// Drain stops or resumes assignments to a worker.
func (c *Cluster) Drain(ctx context.Context, req *adminpb.DrainRequest) (*adminpb.DrainResponse, error) {
	if req.Worker == "" {
		return nil, status.Error(codes.InvalidArgument, "worker is required")
	}
	if err := c.ws.Drain(ctx, req.Worker, req.Drained); err != nil {
		return nil, err
	}
	return &adminpb.DrainResponse{}, nil
}

// AddMember adds a voter.
func (c *Cluster) AddMember(ctx context.Context, req *adminpb.AddMemberRequest) (*adminpb.ClusterStatus, error) {
	if req.Id == "" || req.Raft == "" {
		return nil, status.Error(codes.InvalidArgument, "id and raft address are required")
	}
	if err := c.n.AddVoter(req.Id, req.Raft); err != nil {
		return nil, err
	}
	return c.Status(ctx, nil)
}

// RemoveMember removes a node.
func (c *Cluster) RemoveMember(ctx context.Context, req *adminpb.RemoveMemberRequest) (*adminpb.ClusterStatus, error) {
	if req.Id == "" {
		return nil, status.Error(codes.InvalidArgument, "id is required")
	}
	if err := c.n.RemoveServer(req.Id); err != nil {
		return nil, err
	}
	return c.Status(ctx, nil)
}
