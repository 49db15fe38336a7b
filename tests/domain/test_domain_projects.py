from domain_support import (
    ADMIN_ID,
    T0,
    actor,
    admin,
    ctx,
    member_added,
    project_created,
    project_state,
    registered,
    user_state,
)
from gwt import given

from domain import (
    SYSTEM_ACTOR,
    AlreadyExists,
    Conflict,
    InvalidCommand,
    NotFound,
    PermissionDenied,
    ProjectRole,
    Role,
    projects,
    users,
)
from domain.projects import Visibility, can_manage, can_read, can_write

OWNER = ("owen", actor("owen"))
ARCHIVED = projects.ProjectArchived(project_id="p1", by="owen", at=T0)


def test_creating_a_project_makes_the_actor_its_owner():
    command = projects.CreateProject(project_id="p1", name="  Apollo ", description="Moon\nshot")
    given().when(command, ctx=ctx("owen"), related=actor("owen")).then(
        projects.ProjectCreated(
            project_id="p1",
            owner_id="owen",
            name="Apollo",
            description="Moon\nshot",
            visibility=Visibility.PRIVATE,
            at=T0,
        )
    )


def test_creating_needs_projects_create_and_a_signed_in_actor():
    command = projects.CreateProject(project_id="p1", name="Apollo")
    given().when(command, ctx=ctx()).then_raises(PermissionDenied)
    viewer = actor("vic", roles=(Role.VIEWER,))
    given().when(command, ctx=ctx("vic"), related=viewer).then_raises(PermissionDenied)


def test_creating_an_existing_project_or_a_nameless_one_is_refused():
    command = projects.CreateProject(project_id="p1", name="Apollo")
    given(project_created()).when(command, ctx=ctx("owen"), related=actor("owen")).then_raises(
        AlreadyExists
    )
    nameless = projects.CreateProject(project_id="p2", name="   ")
    error = (
        given().when(nameless, ctx=ctx("owen"), related=actor("owen")).then_raises(InvalidCommand)
    )
    assert error.field == "name"


def test_the_owner_renames_and_an_unchanged_update_emits_nothing():
    given(project_created()).when(
        projects.UpdateProject(project_id="p1", name="Artemis"), ctx=ctx("owen"), related=OWNER[1]
    ).then(projects.ProjectUpdated(project_id="p1", name="Artemis", description="", by="owen"))
    given(project_created()).when(
        projects.UpdateProject(project_id="p1", name="Apollo"), ctx=ctx("owen"), related=OWNER[1]
    ).then()


def test_editors_may_not_manage_but_managers_and_admins_may():
    command = projects.ChangeVisibility(project_id="p1", visibility=Visibility.PUBLIC)
    made_public = projects.ProjectVisibilityChanged(
        project_id="p1", visibility=Visibility.PUBLIC, by="mia"
    )
    history = (
        project_created(),
        member_added("ed", ProjectRole.EDITOR),
        member_added("mia", ProjectRole.MANAGER),
    )
    given(*history).when(command, ctx=ctx("ed"), related=actor("ed")).then_raises(PermissionDenied)
    given(*history).when(command, ctx=ctx("mia"), related=actor("mia")).then(made_public)
    events = given(*history).when(command, ctx=ctx(ADMIN_ID), related=admin()).events()
    assert events[0].by == ADMIN_ID


def test_commands_on_a_missing_project_raise_not_found():
    given().when(
        projects.ArchiveProject(project_id="p9"), ctx=ctx("owen"), related=OWNER[1]
    ).then_raises(NotFound)


def test_adding_a_member_needs_an_active_registered_user():
    command = projects.AddMember(project_id="p1", user_id="ed", role=ProjectRole.EDITOR)
    related = {**OWNER[1], "member": user_state("ed")}
    given(project_created()).when(command, ctx=ctx("owen"), related=related).then(
        member_added("ed", ProjectRole.EDITOR, "p1").model_copy(update={"by": "owen"})
    )
    given(project_created()).when(command, ctx=ctx("owen"), related=OWNER[1]).then_raises(NotFound)
    inactive = user_state("ed", users.UserDeactivated(user_id="ed", by="x", at=T0))
    given(project_created()).when(
        command, ctx=ctx("owen"), related={**OWNER[1], "member": inactive}
    ).then_raises(Conflict)


def test_adding_the_owner_or_an_existing_member_is_refused():
    related = {**OWNER[1], "member": user_state("owen")}
    given(project_created()).when(
        projects.AddMember(project_id="p1", user_id="owen", role=ProjectRole.EDITOR),
        ctx=ctx("owen"),
        related=related,
    ).then_raises(Conflict)
    given(project_created(), member_added("ed", ProjectRole.VIEWER)).when(
        projects.AddMember(project_id="p1", user_id="ed", role=ProjectRole.EDITOR),
        ctx=ctx("owen"),
        related={**OWNER[1], "member": user_state("ed")},
    ).then_raises(AlreadyExists)


def test_member_roles_change_and_members_are_removed():
    history = (project_created(), member_added("ed", ProjectRole.VIEWER))
    given(*history).when(
        projects.ChangeMemberRole(project_id="p1", user_id="ed", role=ProjectRole.EDITOR),
        ctx=ctx("owen"),
        related=OWNER[1],
    ).then(
        projects.MemberRoleChanged(
            project_id="p1", user_id="ed", role=ProjectRole.EDITOR, by="owen"
        )
    )
    given(*history).when(
        projects.RemoveMember(project_id="p1", user_id="ed"), ctx=ctx("owen"), related=OWNER[1]
    ).then(projects.MemberRemoved(project_id="p1", user_id="ed", by="owen"))
    given(*history).when(
        projects.RemoveMember(project_id="p1", user_id="zed"), ctx=ctx("owen"), related=OWNER[1]
    ).then_raises(NotFound)


def test_a_member_may_leave_without_manage_rights():
    given(project_created(), member_added("ed", ProjectRole.VIEWER)).when(
        projects.RemoveMember(project_id="p1", user_id="ed"), ctx=ctx("ed"), related=actor("ed")
    ).then(projects.MemberRemoved(project_id="p1", user_id="ed", by="ed"))


def test_an_archived_project_refuses_changes_until_restored():
    given(project_created()).when(
        projects.ArchiveProject(project_id="p1"), ctx=ctx("owen"), related=OWNER[1]
    ).then(ARCHIVED)
    given(project_created(), ARCHIVED).when(
        projects.UpdateProject(project_id="p1", name="Zeus"), ctx=ctx("owen"), related=OWNER[1]
    ).then_raises(Conflict)
    given(project_created(), ARCHIVED).when(
        projects.RestoreProject(project_id="p1"), ctx=ctx("owen"), related=OWNER[1]
    ).then(projects.ProjectRestored(project_id="p1", by="owen", at=T0))
    given(project_created(), ARCHIVED).when(
        projects.ArchiveProject(project_id="p1"), ctx=ctx("owen"), related=OWNER[1]
    ).then()


def test_read_access_public_private_members_and_read_all():
    private = project_state(member_added("vic", ProjectRole.VIEWER))
    public = project_state(
        projects.ProjectVisibilityChanged(project_id="p1", visibility=Visibility.PUBLIC, by="owen")
    )
    assert can_read(private, "owen", [Role.MEMBER])
    assert can_read(private, "vic", [Role.VIEWER])
    assert not can_read(private, "stranger", [Role.MEMBER])
    assert can_read(private, "auditor", [Role.ADMIN])
    assert can_read(public, None, [])
    assert not can_read(projects.initial_state(), "owen", [Role.ADMIN])


def test_write_access_follows_project_role_and_global_role():
    state = project_state(
        member_added("vic", ProjectRole.VIEWER),
        member_added("ed", ProjectRole.EDITOR),
        member_added("mia", ProjectRole.MANAGER),
    )
    assert can_write(state, "owen", [Role.MEMBER])
    assert can_write(state, "ed", [Role.MEMBER])
    assert can_write(state, "mia", [Role.MEMBER])
    assert not can_write(state, "vic", [Role.MEMBER])
    assert not can_write(state, "ed", [Role.VIEWER])  # a read-only account stays read-only
    assert can_write(state, "root", [Role.ADMIN])
    assert not can_manage(state, "ed", [Role.MEMBER])
    assert can_manage(state, "mia", [Role.MEMBER])
    assert can_manage(state, "owen", [])
    assert can_manage(state, SYSTEM_ACTOR, [Role.ADMIN])


def test_evolve_ignores_events_of_other_aggregates():
    state = project_state()
    assert projects.evolve(state, registered("alice")) == state


def test_deleting_a_project_is_for_managers_and_then_it_takes_no_command():
    delete = projects.DeleteProject(project_id="p1")
    deleted = projects.ProjectDeleted(project_id="p1", by="owen", at=T0)
    given(project_created()).when(delete, ctx=ctx("owen"), related=actor("owen")).then(deleted)
    given(project_created(), ARCHIVED).when(delete, ctx=ctx("owen"), related=actor("owen")).then(
        projects.ProjectDeleted(project_id="p1", by="owen", at=T0)
    )
    editor = member_added("ed", ProjectRole.EDITOR)
    given(project_created(), editor).when(delete, ctx=ctx("ed"), related=actor("ed")).then_raises(
        PermissionDenied
    )
    for command in (
        delete,
        projects.RestoreProject(project_id="p1"),
        projects.UpdateProject(project_id="p1", name="Back"),
    ):
        given(project_created(), deleted).when(
            command, ctx=ctx("owen"), related=actor("owen")
        ).then_raises(NotFound)
    again = projects.CreateProject(project_id="p1", name="Again")
    given(project_created(), deleted).when(
        again, ctx=ctx("owen"), related=actor("owen")
    ).then_raises(AlreadyExists)


def test_naming_another_owner_is_for_the_service_context_and_project_admins():
    command = projects.CreateProject(project_id="p1", name="Apollo", owner_id="ada")
    created = projects.ProjectCreated(
        project_id="p1",
        owner_id="ada",
        name="Apollo",
        description="",
        visibility=Visibility.PRIVATE,
        at=T0,
    )
    ada = {"owner": user_state("ada")}
    given().when(command, ctx=ctx(), related=ada).then(created)  # no actor: the service
    given().when(command, ctx=ctx(ADMIN_ID), related={**admin(), **ada}).then(created)
    given().when(command, ctx=ctx(SYSTEM_ACTOR), related=ada).then(created)
    given().when(command, ctx=ctx("bob"), related={**actor("bob"), **ada}).then_raises(
        PermissionDenied
    )
    given().when(command, ctx=ctx(), related={}).then_raises(NotFound)
    inactive = {"owner": user_state("ada", users.UserDeactivated(user_id="ada", by="root", at=T0))}
    given().when(command, ctx=ctx(), related=inactive).then_raises(Conflict)
